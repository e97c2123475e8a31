//! The network map: relays placed by their coordinates, links coloured by
//! quality, the links that carry primary routes drawn thick. One renderer
//! for the status page, `/map.svg` and `relayctl map`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::api::{ClusterStatus, MapView};
use crate::state::Admin;

const W: f64 = 960.0;
const H: f64 = 520.0;
const MARGIN: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Quality of an undirected pair: the worse direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Quality {
    Good,
    Poor,
}

/// The map as a standalone SVG document.
pub fn svg(map: &MapView) -> String {
    // Fit the relays' bounding box (equirectangular), with some context
    // around small networks.
    let located: Vec<(f64, f64)> = map.relays.iter().filter_map(|r| r.location).collect();
    let (mut lat0, mut lat1, mut lon0, mut lon1) = (-60.0f64, 75.0f64, -180.0f64, 180.0f64);
    if !located.is_empty() {
        lat0 = located.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        lat1 = located
            .iter()
            .map(|p| p.0)
            .fold(f64::NEG_INFINITY, f64::max);
        lon0 = located.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        lon1 = located
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max);
        let pad_lat = ((lat1 - lat0) * 0.15).max(8.0);
        let pad_lon = ((lon1 - lon0) * 0.1).max(12.0);
        (lat0, lat1) = ((lat0 - pad_lat).max(-85.0), (lat1 + pad_lat).min(85.0));
        (lon0, lon1) = ((lon0 - pad_lon).max(-180.0), (lon1 + pad_lon).min(180.0));
    }
    let px = |lon: f64| MARGIN + (lon - lon0) / (lon1 - lon0) * (W - 2.0 * MARGIN);
    let py = |lat: f64| MARGIN + (lat1 - lat) / (lat1 - lat0) * (H - 2.0 * MARGIN);
    // Relays without coordinates go on a row at the bottom.
    let mut pos: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    let mut unplaced = 0.0;
    for r in &map.relays {
        let p = match r.location {
            Some((lat, lon)) => (px(lon), py(lat)),
            None => {
                unplaced += 1.0;
                (MARGIN + 90.0 * unplaced, H - 20.0)
            }
        };
        pos.insert(r.id.0, p);
    }
    let mut pairs: BTreeMap<(u32, u32), Quality> = BTreeMap::new();
    for l in &map.links {
        let key = (l.from.0.min(l.to.0), l.from.0.max(l.to.0));
        let q = if l.poor { Quality::Poor } else { Quality::Good };
        let e = pairs.entry(key).or_insert(q);
        *e = (*e).max(q);
    }
    let mut in_force: BTreeSet<(u32, u32)> = BTreeSet::new();
    for p in &map.primaries {
        for w in p.windows(2) {
            in_force.insert((w[0].0.min(w[1].0), w[0].0.max(w[1].0)));
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="#f4f8fc"/>
<text x="{}" y="26" font-size="16" font-weight="bold" text-anchor="middle">Relay network, route epoch {}</text>"##,
        W / 2.0,
        map.epoch
    );
    // Graticule every 15 degrees.
    let mut lat = (lat0 / 15.0).ceil() * 15.0;
    while lat <= lat1 {
        let _ = writeln!(
            out,
            r##"<line x1="{MARGIN}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#dde6ef"/>"##,
            py(lat),
            W - MARGIN
        );
        lat += 15.0;
    }
    let mut lon = (lon0 / 15.0).ceil() * 15.0;
    while lon <= lon1 {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{MARGIN}" x2="{0:.1}" y2="{1}" stroke="#dde6ef"/>"##,
            px(lon),
            H - MARGIN
        );
        lon += 15.0;
    }
    for (&(a, b), &q) in &pairs {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(&a), pos.get(&b)) else {
            continue;
        };
        let color = match q {
            Quality::Good => "#2ca02c",
            Quality::Poor => "#e8710a",
        };
        let used = in_force.contains(&(a, b));
        let (width, dash) = if used {
            (4.0, "")
        } else {
            (1.5, r#" stroke-dasharray="5 4""#)
        };
        let _ = writeln!(
            out,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{color}" stroke-width="{width}" stroke-opacity="0.85"{dash}><title>{a} - {b}: {}</title></line>"#,
            if used { "carries routes" } else { "standby" }
        );
    }
    for r in &map.relays {
        let (x, y) = pos[&r.id.0];
        let fill = match (r.alive, r.admin) {
            (false, _) => "#d62728",
            (true, Admin::Draining) => "#f2b134",
            (true, _) => "#1f3b73",
        };
        let _ = writeln!(
            out,
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="8" fill="{fill}" stroke="#fff" stroke-width="2"><title>{}</title></circle>
<text x="{:.1}" y="{:.1}" font-weight="bold">{} {}</text>
<text x="{:.1}" y="{:.1}" font-size="10" fill="#444">{} clients</text>"##,
            esc(&r.addr),
            x + 11.0,
            y - 3.0,
            esc(&r.region),
            r.id.0,
            x + 11.0,
            y + 10.0,
            r.clients
        );
    }
    let ly = H - 18.0;
    for (i, (label, color, dash)) in [
        ("good link carrying routes", "#2ca02c", ""),
        ("poor link", "#e8710a", ""),
        ("link on standby", "#2ca02c", r#" stroke-dasharray="5 4""#),
    ]
    .iter()
    .enumerate()
    {
        let x = MARGIN + 250.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{label}</text>"#,
            x + 28.0,
            x + 34.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The status page: cluster, map, relays and links; refreshes itself.
pub fn page(status: Option<&ClusterStatus>, map: &MapView) -> String {
    let mut out = String::new();
    out.push_str(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>Relay network status</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th { background: #eef3f8; } .poor { color: #c25400; font-weight: bold; } .down { color: #d62728; }
</style></head><body>
<h1>Relay network</h1>
"#,
    );
    if let Some(s) = status {
        let _ = writeln!(
            out,
            "<p>Control-plane node {} of {} members; leader {}, term {}, commit {}, applied {}; route epoch {}.</p>",
            s.node.id,
            s.members.len(),
            s.node.leader,
            s.node.term,
            s.node.commit,
            s.node.applied,
            s.route_epoch
        );
    }
    out.push_str(&svg(map));
    out.push_str("<h2>Relays</h2>\n<table><tr><th>id</th><th>name</th><th>region</th><th>address</th><th>state</th><th>alive</th><th>clients</th></tr>\n");
    for r in &map.relays {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td></tr>",
            r.id.0,
            esc(&r.name),
            esc(&r.region),
            esc(&r.addr),
            format!("{:?}", r.admin).to_lowercase(),
            if r.alive { "" } else { r#" class="down""# },
            if r.alive { "yes" } else { "no" },
            r.clients
        );
    }
    out.push_str("</table>\n<h2>Links</h2>\n<table><tr><th>from</th><th>to</th><th>RTT ms</th><th>jitter ms</th><th>loss %</th><th></th></tr>\n");
    for l in &map.links {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td{}>{}</td></tr>",
            l.from.0,
            l.to.0,
            l.rtt_ms,
            l.jitter_ms,
            100.0 * l.loss,
            if l.poor { r#" class="poor""# } else { "" },
            if l.poor { "poor" } else { "" }
        );
    }
    out.push_str("</table>\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LinkView, RelayView};
    use topology::RelayId;

    fn relay(id: u32, region: &str, lat: f64, lon: f64) -> RelayView {
        RelayView {
            id: RelayId(id),
            name: format!("relay-{id}"),
            region: region.into(),
            addr: format!("127.0.0.1:740{id}"),
            admin: Admin::Active,
            alive: id != 4,
            clients: id,
            location: Some((lat, lon)),
        }
    }

    fn link(from: u32, to: u32, poor: bool) -> LinkView {
        LinkView {
            from: RelayId(from),
            to: RelayId(to),
            rtt_ms: 100.0,
            jitter_ms: 1.0,
            loss: 0.0,
            poor,
        }
    }

    #[test]
    fn map_shows_relays_links_quality_and_routes() {
        let map = MapView {
            epoch: 7,
            relays: vec![
                relay(1, "SG", 1.35, 103.8),
                relay(2, "ID", -6.2, 106.8),
                relay(3, "US", 32.8, -96.8),
                relay(4, "DE", 50.1, 8.7),
            ],
            links: vec![
                link(1, 2, false),
                link(2, 1, false),
                link(2, 3, true),
                link(1, 3, false),
            ],
            primaries: vec![vec![RelayId(2), RelayId(1), RelayId(3)]],
        };
        let s = svg(&map);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("route epoch 7"));
        for region in ["SG", "ID", "US", "DE"] {
            assert!(s.contains(&format!(">{region} ")), "{region}");
        }
        // The poor direct link is orange; the links of the route are thick.
        assert!(s.contains(r##"stroke="#e8710a" stroke-width="1.5""##));
        assert_eq!(s.matches(r#"stroke-width="4""#).count(), 2);
        // The dead relay is red.
        assert!(s.contains("#d62728"));
        let page = page(None, &map);
        assert!(page.contains("<svg") && page.contains(r#"class="poor""#));
    }
}
