//! The simulator on a small built-in world: runs repeat exactly with their
//! seed, failures are routed around, streams are delivered.

use simulations::scenario::Scenario;
use simulations::sim::{Mechanism, RunResult, Sim};
use simulations::world::World;

const COUNTRIES: &[&str] = &["SG", "ID", "PH", "US", "DE", "JP", "GB", "IN"];

fn world() -> World {
    World::builtin(COUNTRIES).unwrap()
}

fn run(toml: &str, seed: u64) -> RunResult {
    let mut scenario = Scenario::parse(toml, "test").unwrap();
    scenario.seed = seed;
    let result = Sim::new(scenario, &world(), false).unwrap().run();
    // Printed so a failing run can be repeated.
    eprintln!("scenario {} seed {seed}", result.scenario);
    result
}

const KILL: &str = r#"
name = "kill"
duration_s = 90
[world]
countries = ["SG", "ID", "PH", "US", "DE", "JP", "GB", "IN"]
relays = 16
[relay]
probe_interval_ms = 100
probe_timeout_ms = 300
[flows]
count = 100
[pairs]
sample = 0
[[streams]]
channel = "live"
publisher = "ID"
subscriber_countries = ["US", "DE", "GB"]
subscribers = 30
join_at_s = 5
join_window_s = 5
[[events]]
at_s = 40
kind = "kill"
relays = ["SG-1"]
[report]
map_at_s = [30, 50]
warmup_s = 20
"#;

#[test]
fn a_run_repeats_exactly_with_its_seed() {
    let a = serde_json::to_string(&run(KILL, 42)).unwrap();
    let b = serde_json::to_string(&run(KILL, 42)).unwrap();
    assert!(a == b, "same seed, different results");
    let c = serde_json::to_string(&run(KILL, 43)).unwrap();
    assert!(a != c, "a different seed changes the run");
}

/// Relays get their tables' backups only once they could use one (a link
/// unusable); shipping every table with its backups, as the control plane
/// does, must give the same run. The kill makes relays switch to backups
/// and repair, and the degradation makes links unusable for long.
#[test]
fn backups_added_on_demand_change_nothing() {
    let degrade = KILL.replace(
        "kind = \"kill\"\nrelays = [\"SG-1\"]",
        "kind = \"degrade\"\nfrom = [\"ID\"]\nprofile = \"sea-3g\"",
    );
    assert_ne!(degrade, KILL);
    for (toml, seed) in [(KILL, 5), (degrade.as_str(), 6)] {
        let scenario = Scenario::parse(toml, "test").unwrap();
        let mut eager = scenario.clone();
        eager.seed = seed;
        let mut lazy = scenario;
        lazy.seed = seed;
        let eager = Sim::new(eager, &world(), false)
            .unwrap()
            .with_eager_backups()
            .run();
        let lazy = Sim::new(lazy, &world(), false).unwrap().run();
        eprintln!("scenario {} seed {seed}", lazy.scenario);
        assert!(!lazy.reroutes.is_empty(), "nothing was rerouted");
        // Some tables were completed on demand, some never needed it.
        let (pending, completed) = lazy.backups_completed;
        assert!(
            0 < completed && completed < pending,
            "{pending} {completed}"
        );
        assert_eq!(eager.backups_completed, (0, 0));
        let (eager, lazy) = (
            serde_json::to_string(&eager).unwrap(),
            serde_json::to_string(&lazy).unwrap(),
        );
        assert!(eager == lazy, "backups on demand changed the run");
    }
}

#[test]
fn killed_transit_relay_is_routed_around_and_streams_keep_flowing() {
    let r = run(KILL, 7);
    assert_eq!(r.relays.len(), 16);
    assert_eq!(r.events.len(), 1);
    // Pairs whose path crossed SG-1 got a good path again, quickly, and
    // locally (backups) for most of them.
    assert!(!r.reroutes.is_empty(), "the kill hurt no sampled pair");
    assert_eq!(r.unrecovered, 0, "{:?}", r.reroutes);
    let local: Vec<f64> = r
        .reroutes
        .iter()
        .filter(|x| x.mechanism == Mechanism::Local)
        .map(|x| x.seconds)
        .collect();
    assert!(!local.is_empty());
    let worst = r.reroutes.iter().map(|x| x.seconds).fold(0.0, f64::max);
    assert!(worst < 15.0, "slowest reroute {worst} s");
    // The stream from ID reaches every subscriber with nothing duplicated.
    let s = &r.streams[0];
    assert_eq!(s.receiving, s.subscribers, "{s:?}");
    assert!(s.delivery > 0.95, "{s:?}");
    assert_eq!(s.duplicates, 0);
    // The maps see SG-1 alive, then dead.
    let sg = r.relays.iter().position(|x| x.name == "SG-1").unwrap();
    assert!(r.maps[0].alive[sg] && !r.maps[1].alive[sg]);
}

#[test]
fn degraded_paths_are_avoided_by_the_overlay() {
    let r = run(
        r#"
name = "degrade"
duration_s = 120
[world]
countries = ["SG", "ID", "PH", "US", "DE", "JP", "GB", "IN"]
relays = 8
[flows]
count = 50
from = ["ID"]
[pairs]
sample = 0
[[events]]
at_s = 40
kind = "degrade"
from = ["ID"]
except = ["SG"]
profile = "sea-3g"
[report]
warmup_s = 20
"#,
        3,
    );
    let (direct, overlay, oracle) = r.poor_share;
    assert!(direct > overlay, "direct {direct} overlay {overlay}");
    assert!(
        overlay <= oracle + 0.5 * (direct - oracle),
        "{:?}",
        r.poor_share
    );
    // After the degradation ID's flows go through SG on the overlay.
    let ratio = r.overlay_vs_oracle.unwrap();
    assert!(
        ratio > 0.8,
        "overlay removes {ratio} of what the oracle removes"
    );
    let flows_better = r
        .flow_results
        .iter()
        .filter(|f| f.overlay.2 < f.direct.2)
        .count();
    assert!(flows_better > 0);
}
