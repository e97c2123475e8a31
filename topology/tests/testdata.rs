//! Table-driven route computation cases from `topology/testdata/*.txt`
//! (format in `topology/testdata/README.md`).

use std::path::Path;

use topology::{Graph, Metrics, RelayId, RelayState, Route, RouteSet, RoutingConfig};

fn relay(s: &str) -> RelayId {
    RelayId(s.parse().unwrap_or_else(|_| panic!("bad relay id {s:?}")))
}

fn path(s: &str) -> Vec<RelayId> {
    s.split(',').map(relay).collect()
}

fn pair(s: &str) -> (RelayId, RelayId, bool) {
    if let Some((a, b)) = s.split_once("<->") {
        (relay(a), relay(b), true)
    } else if let Some((a, b)) = s.split_once("->") {
        (relay(a), relay(b), false)
    } else {
        panic!("expected A->B or A<->B, got {s:?}")
    }
}

fn hops(r: &Route) -> Vec<RelayId> {
    r.hops.to_vec()
}

fn run_case(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let config = RoutingConfig::default();
    let mut graph = Graph::new();
    let mut routes: Option<RouteSet> = None;
    let mut dirty = true;
    let mut checks = 0;
    for (lineno, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", file.display(), lineno + 1);
        let mut words = line.split_whitespace();
        match words.next().unwrap() {
            "relay" => {
                let rest: Vec<&str> = words.collect();
                match rest.as_slice() {
                    [id, "draining"] => graph.set_state(relay(id), RelayState::Draining),
                    [id, "down"] => graph.set_state(relay(id), RelayState::Down),
                    ids => ids.iter().for_each(|id| graph.add_relay(relay(id))),
                }
                dirty = true;
            }
            "link" => {
                let (a, b, both) = pair(words.next().unwrap());
                let mut m = graph.link(a, b).copied().unwrap_or_default();
                for kv in words {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{at}: bad {kv:?}"));
                    let v: f64 = v.parse().unwrap();
                    match k {
                        "rtt" => m.rtt_ms = v,
                        "jitter" => m.jitter_ms = v,
                        "loss" => m.loss = v,
                        _ => panic!("{at}: unknown key {k}"),
                    }
                }
                set(&mut graph, a, b, m, &at);
                if both {
                    set(&mut graph, b, a, m, &at);
                }
                dirty = true;
            }
            verb @ ("route" | "noroute") => {
                if dirty {
                    routes = Some(RouteSet::compute(&graph, &config, routes.as_ref()));
                    dirty = false;
                }
                let (a, b, _) = pair(words.next().unwrap());
                let entry = routes.as_ref().unwrap().route(a, b);
                checks += 1;
                if verb == "noroute" {
                    assert!(entry.is_none(), "{at}: expected no route, got {entry:?}");
                    continue;
                }
                let entry = entry.unwrap_or_else(|| panic!("{at}: no route {a}->{b}"));
                for kv in words {
                    let (k, v) = kv.split_once('=').unwrap();
                    match k {
                        "primary" => assert_eq!(hops(&entry.primary), path(v), "{at}: primary"),
                        "backup" if v == "none" => {
                            assert!(
                                entry.backup.is_none(),
                                "{at}: unexpected backup {:?}",
                                entry.backup
                            )
                        }
                        "backup" => {
                            let b = entry
                                .backup
                                .as_ref()
                                .unwrap_or_else(|| panic!("{at}: no backup"));
                            assert_eq!(hops(b), path(v), "{at}: backup");
                        }
                        "cost" => {
                            let want: f64 = v.parse().unwrap();
                            assert!(
                                (entry.primary.cost - want).abs() < 1e-3,
                                "{at}: cost {}",
                                entry.primary.cost
                            );
                        }
                        "poor" => assert_eq!(entry.primary.poor, v == "true", "{at}: poor"),
                        _ => panic!("{at}: unknown key {k}"),
                    }
                }
            }
            other => panic!("{at}: unknown directive {other}"),
        }
    }
    assert!(checks > 0, "{}: no checks", file.display());
}

fn set(graph: &mut Graph, a: RelayId, b: RelayId, m: Metrics, at: &str) {
    graph
        .set_link(a, b, m)
        .unwrap_or_else(|e| panic!("{at}: {e}"));
}

#[test]
fn testdata_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the case files in {}",
        dir.display()
    );
    for f in files {
        run_case(&f);
    }
}
