//! SVG plots of a run: poor pairs over time, reroute CDFs, flow outcomes,
//! route changes, and the world map.
//!
//! Hand-written SVG (a few primitives): the plotting crates either need
//! system fonts to lay out text or pull a browser-side toolchain, and these
//! charts are simple.

use std::fmt::Write as _;

use crate::sim::{Mechanism, RunResult};

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 5] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"];

/// A line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
    /// Draw as steps (CDF) rather than straight segments.
    pub steps: bool,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="#ffffff"/>
<text x="{}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>
"##,
        w / 2.0,
        esc(title)
    );
}

/// Round tick step for a range.
fn tick_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart with axes, legend and optional vertical markers.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: &[(f64, String)],
    y_max: Option<f64>,
) -> String {
    let mut out = String::new();
    header(&mut out, W, H, title);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = y_max.unwrap_or(if y1 <= 0.0 { 1.0 } else { y1 * 1.08 });
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y.min(y1) / y1) * ph;
    // Grid and ticks.
    let xs = tick_step(x1 - x0);
    let mut t = (x0 / xs).ceil() * xs;
    while t <= x1 + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#e5e5e5"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            sx(t),
            TOP,
            TOP + ph,
            TOP + ph + 16.0,
            fmt_tick(t)
        );
        t += xs;
    }
    let ys = tick_step(y1);
    let mut t = 0.0;
    while t <= y1 + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{1}" y1="{0:.1}" x2="{2}" y2="{0:.1}" stroke="#e5e5e5"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            sy(t),
            LEFT,
            LEFT + pw,
            LEFT - 6.0,
            sy(t) + 4.0,
            fmt_tick(t)
        );
        t += ys;
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        LEFT + pw / 2.0,
        H - 14.0,
        esc(x_label),
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, (x, label)) in markers.iter().enumerate() {
        if *x < x0 || *x > x1 {
            continue;
        }
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#888" stroke-dasharray="4 3"/><text x="{3:.1}" y="{4:.1}" font-size="10" fill="#555">{5}</text>"##,
            sx(*x),
            TOP,
            TOP + ph,
            sx(*x) + 3.0,
            TOP + 12.0 + 11.0 * (i % 4) as f64,
            esc(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut d = String::new();
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let (px, py) = (sx(x), sy(y));
            match prev {
                None => {
                    let _ = write!(d, "M{px:.1},{py:.1}");
                }
                Some((_, qy)) if s.steps => {
                    let _ = write!(d, " L{px:.1},{qy:.1} L{px:.1},{py:.1}");
                }
                Some(_) => {
                    let _ = write!(d, " L{px:.1},{py:.1}");
                }
            }
            prev = Some((px, py));
        }
        let _ = writeln!(
            out,
            r##"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>
<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{color}" stroke-width="3"/><text x="{3}" y="{4}">{5}</text>"##,
            W - RIGHT + 12.0,
            TOP + 10.0 + 20.0 * i as f64,
            W - RIGHT + 34.0,
            W - RIGHT + 40.0,
            TOP + 14.0 + 20.0 * i as f64,
            esc(&s.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The empirical CDF of `values` as chart points.
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mut pts = Vec::with_capacity(v.len() + 1);
    if let Some(&first) = v.first() {
        pts.push((first, 0.0));
    }
    for (i, x) in v.iter().enumerate() {
        pts.push((*x, (i + 1) as f64 / n));
    }
    pts
}

/// Poor pairs over time: direct, overlay and oracle, with the events.
pub fn poor_pairs(r: &RunResult) -> String {
    // From the end of the warm-up: before it, links are still being
    // measured and the first routes computed.
    let pick = |f: fn(&crate::sim::TimelinePoint) -> f64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .filter(|p| p.t >= r.warmup_s)
            .map(|p| (p.t, 100.0 * f(p)))
            .collect()
    };
    line_chart(
        &format!("{}: relay pairs on a poor path", r.scenario),
        "time (s)",
        "poor pairs (%)",
        &[
            Series {
                label: "direct Internet".into(),
                points: pick(|p| p.direct),
                steps: false,
            },
            Series {
                label: "overlay".into(),
                points: pick(|p| p.overlay),
                steps: false,
            },
            Series {
                label: "oracle".into(),
                points: pick(|p| p.oracle),
                steps: false,
            },
        ],
        &r.events,
        None,
    )
}

/// CDF of time to reroute after events, by mechanism.
pub fn reroute_cdf(r: &RunResult) -> String {
    let local = r.reroute_seconds(Mechanism::Local);
    let cp = r.reroute_seconds(Mechanism::ControlPlane);
    line_chart(
        &format!(
            "{}: time to a good path after an event ({} pairs, {} unrecovered)",
            r.scenario,
            r.reroutes.len(),
            r.unrecovered
        ),
        "seconds after the event",
        "share of affected pairs",
        &[
            Series {
                label: format!("local backup ({})", local.len()),
                points: cdf(&local),
                steps: true,
            },
            Series {
                label: format!("control plane ({})", cp.len()),
                points: cdf(&cp),
                steps: true,
            },
        ],
        &[],
        Some(1.0),
    )
}

/// CDFs of per-flow latency and loss, direct against overlay.
pub fn flows(r: &RunResult) -> String {
    let lat_d: Vec<f64> = r.flow_results.iter().map(|f| f.direct.0).collect();
    let lat_o: Vec<f64> = r.flow_results.iter().map(|f| f.overlay.0).collect();
    let loss_d: Vec<f64> = r.flow_results.iter().map(|f| 100.0 * f.direct.1).collect();
    let loss_o: Vec<f64> = r.flow_results.iter().map(|f| 100.0 * f.overlay.1).collect();
    let a = line_chart(
        &format!(
            "{}: mean one-way latency per flow ({} flows)",
            r.scenario,
            r.flow_results.len()
        ),
        "latency (ms)",
        "share of flows",
        &[
            Series {
                label: "direct".into(),
                points: cdf(&lat_d),
                steps: true,
            },
            Series {
                label: "overlay".into(),
                points: cdf(&lat_o),
                steps: true,
            },
        ],
        &[],
        Some(1.0),
    );
    let b = line_chart(
        &format!("{}: delivered loss per flow", r.scenario),
        "loss (%)",
        "share of flows",
        &[
            Series {
                label: "direct".into(),
                points: cdf(&loss_d),
                steps: true,
            },
            Series {
                label: "overlay".into(),
                points: cdf(&loss_o),
                steps: true,
            },
        ],
        &[],
        Some(1.0),
    );
    stack_vertically(&[a, b])
}

/// Histogram of route changes per pair per hour.
pub fn route_changes(r: &RunResult) -> String {
    let hours = (r.duration_s - r.warmup_s).max(1.0) / 3600.0;
    let per_hour: Vec<f64> = r
        .route_changes_by_pair
        .iter()
        .map(|&c| f64::from(c) / hours)
        .collect();
    line_chart(
        &format!(
            "{}: route changes per pair per hour (mean {:.2})",
            r.scenario, r.route_changes_per_pair_hour
        ),
        "changes per hour",
        "share of pairs",
        &[Series {
            label: "pairs (CDF)".into(),
            points: cdf(&per_hour),
            steps: true,
        }],
        &[],
        Some(1.0),
    )
}

/// Join to first media per stream subscriber.
pub fn streams(r: &RunResult) -> Option<String> {
    if r.streams.is_empty() {
        return None;
    }
    let series: Vec<Series> = r
        .streams
        .iter()
        .map(|s| Series {
            label: format!("{} ({}/{})", s.channel, s.receiving, s.subscribers),
            points: cdf(&s.join_to_first_s),
            steps: true,
        })
        .collect();
    Some(line_chart(
        &format!("{}: join to first media", r.scenario),
        "seconds after joining",
        "share of subscribers",
        &series,
        &[],
        Some(1.0),
    ))
}

fn stack_vertically(parts: &[String]) -> String {
    let mut out = String::new();
    let h = H * parts.len() as f64;
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}">"##
    );
    for (i, p) in parts.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<g transform="translate(0,{})">{p}</g>"#,
            H * i as f64
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The world map at one snapshot: relays placed by coordinates
/// (equirectangular), links coloured by their true quality, links used by
/// sampled pairs drawn thicker.
pub fn world_map(r: &RunResult, snapshot: usize) -> String {
    let snap = &r.maps[snapshot];
    let (w, h) = (1100.0, 560.0);
    let mut out = String::new();
    header(
        &mut out,
        w,
        h,
        &format!(
            "{} at {:.0} s: relays and links by quality",
            r.scenario, snap.at_s
        ),
    );
    let (mx, my, mw, mh) = (20.0, 40.0, w - 40.0, h - 80.0);
    let px = |lon: f64| mx + (lon + 180.0) / 360.0 * mw;
    let py = |lat: f64| my + (75.0 - lat.clamp(-60.0, 75.0)) / 135.0 * mh;
    let _ = writeln!(
        out,
        r##"<rect x="{mx}" y="{my}" width="{mw}" height="{mh}" fill="#eef4fa" stroke="#99a"/>"##
    );
    for lon in (-180..=180).step_by(30) {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{my}" x2="{0:.1}" y2="{1}" stroke="#d8e2ec"/>"##,
            px(f64::from(lon)),
            my + mh
        );
    }
    for lat in (-60..=75).step_by(15) {
        let _ = writeln!(
            out,
            r##"<line x1="{mx}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#d8e2ec"/>"##,
            py(f64::from(lat)),
            mx + mw
        );
    }
    let color = |s: &str| match s {
        "good" => "#2ca02c",
        "poor" => "#ff7f0e",
        _ => "#d62728",
    };
    // Unused links first, faint; used ones on top.
    for pass in [false, true] {
        for &(a, b, state, used) in &snap.links {
            if used != pass {
                continue;
            }
            let (ra, rb) = (&r.relays[a as usize], &r.relays[b as usize]);
            // Take the short way around the globe.
            if (ra.lon - rb.lon).abs() > 180.0 {
                continue;
            }
            let (width, opacity) = match (used, state) {
                (true, _) => (1.4, 0.8),
                (false, "good") => (0.4, 0.15),
                (false, _) => (1.0, 0.6),
            };
            let _ = writeln!(
                out,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="{width}" stroke-opacity="{opacity}"/>"#,
                px(ra.lon),
                py(ra.lat),
                px(rb.lon),
                py(rb.lat),
                color(state)
            );
        }
    }
    let mut labelled = std::collections::HashSet::new();
    for (i, relay) in r.relays.iter().enumerate() {
        let alive = snap.alive.get(i).copied().unwrap_or(true);
        let fill = if alive { "#1f3b73" } else { "#d62728" };
        let _ = writeln!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.2" fill="{fill}" stroke="#fff" stroke-width="0.8"><title>{}</title></circle>"##,
            px(relay.lon),
            py(relay.lat),
            esc(&relay.name)
        );
        if labelled.insert(relay.country.clone()) {
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#333">{}</text>"##,
                px(relay.lon) + 4.0,
                py(relay.lat) - 4.0,
                esc(&relay.country)
            );
        }
    }
    let ly = h - 22.0;
    for (i, (label, c)) in [
        ("good link", "#2ca02c"),
        ("poor link", "#ff7f0e"),
        ("down link", "#d62728"),
        ("thick: carries sampled pairs", "#555"),
    ]
    .iter()
    .enumerate()
    {
        let x = 30.0 + 200.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{label}</text>"#,
            x + 24.0,
            x + 30.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let svg = line_chart(
            "t <x>",
            "x",
            "y",
            &[Series {
                label: "a & b".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN)],
                steps: false,
            }],
            &[(0.5, "event".into())],
            None,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;x&gt;") && svg.contains("a &amp; b"));
        assert!(!svg.contains("NaN"));
        assert_eq!(cdf(&[3.0, 1.0, 2.0]).last(), Some(&(3.0, 1.0)));
        assert_eq!(tick_step(600.0), 100.0);
    }
}
