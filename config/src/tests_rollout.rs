//! Rollouts in the config: defaults, and every mistake with its field path.

use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn with_rollouts(rollouts: &str) -> String {
    format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: checkout
        match: {{ path_prefix: /checkout }}
        split: [{{ cluster: v1, weight: 90 }}, {{ cluster: v2, weight: 10 }}]
        hash_on: header:x-user-id
      - name: three
        match: {{ path_prefix: /three }}
        split: [{{ cluster: v1, weight: 1 }}, {{ cluster: v2, weight: 1 }}, {{ cluster: v3, weight: 1 }}]
      - name: plain
        cluster: v1
clusters:
  - {{ name: v1, endpoints: ["127.0.0.1:1"] }}
  - {{ name: v2, endpoints: ["127.0.0.1:2"] }}
  - {{ name: v3, endpoints: ["127.0.0.1:3"] }}
rollouts:
{rollouts}
"#
    )
}

#[test]
fn a_rollout_loads_with_the_documented_defaults() {
    let cfg = load(
        &with_rollouts("  checkout-v2: { route: checkout, canary: v2, steps: [5, 25, 50, 100] }"),
        Some("c.yaml"),
    )
    .unwrap();
    let r = &cfg.rollouts["checkout-v2"];
    assert_eq!(r.interval, Duration::from_secs(30));
    assert_eq!(r.min_requests, 50);
    assert_eq!(r.max_error_rate_increase, Percent(1.0));
    assert_eq!(r.max_p99_increase, Percent(20.0));
    assert_eq!(r.min_p99_increase, Duration::from_millis(10));
    assert_eq!(r.on_failure, OnFailure::Rollback);
    assert_eq!(rollout::locate(&cfg, r), Some((0, 0, 1)));
    // Written back as written: percentages with their sign.
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(json["rollouts"]["checkout-v2"]["max_p99_increase"], "20%");
    let again: Config = serde_json::from_value(json).unwrap();
    assert_eq!(again, cfg);
    let full = load(
        &with_rollouts(
            "  r: { route: checkout, canary: v1, steps: [100], interval: 2s, min_requests: 1,\n       max_error_rate_increase: 0.5%, max_p99_increase: 150, on_failure: pause }",
        ),
        Some("c.yaml"),
    )
    .unwrap();
    let r = &full.rollouts["r"];
    assert_eq!(
        (r.max_error_rate_increase.0, r.max_p99_increase.0),
        (0.5, 150.0)
    );
    assert_eq!(r.on_failure, OnFailure::Pause);
}

#[test]
fn rollout_mistakes_are_reported_with_their_paths() {
    let errs = errors_of(&with_rollouts(
        r#"  a: { route: nope, canary: v2, steps: [5, 100] }
  b: { route: plain, canary: v1, steps: [100] }
  c: { route: checkout, canary: v3, steps: [50, 25, 0, 90] }
  d: { route: three, canary: v2, steps: [100], interval: 1s, min_requests: 0 }
  e: { route: checkout, canary: v2, steps: [], max_error_rate_increase: 101%, max_p99_increase: -1, min_p99_increase: 2m }
  f: { route: checkout, canary: v2, steps: [100], on_failure: retry }
  g: { route: checkout, canary: v2, steps: [100], max_p99_increase: lots }"#,
    ));
    for expected in [
        "rollouts.a.route: no route is named `nope`",
        "rollouts.b.route: route `plain` has no split of two or more clusters to ramp (rollout `b`)",
        "rollouts.c.canary: `v3` is not a side of route `checkout`'s split (its sides: v1, v2)",
        "rollouts.c.steps[1]: steps must ascend: 25 after 50",
        "rollouts.c.steps[2]: must be between 1 and 100",
        "rollouts.c.steps[3]: the last step must be 100 (the canary takes all traffic)",
        "rollouts.d.canary: must be the first or the last side of the split (so that users who saw the canary keep seeing it as it grows)",
        "rollouts.d.interval: must be between 2s (proxies report every 2s) and 15m",
        "rollouts.d.min_requests: must be between 1 and 100000000",
        "rollouts.e.steps: needs at least one step (the last 100)",
        "rollouts.e.max_error_rate_increase: must be between 0% and 100%",
        "rollouts.e.max_p99_increase: must be between 0% and 10000%",
        "rollouts.e.min_p99_increase: must be at most 1m",
        "rollouts.e.route: route `checkout` already has rollout `c`",
    ] {
        assert!(
            errs.iter().any(|e| e == expected),
            "expected `{expected}` among {errs:#?}"
        );
    }
    assert!(
        errs.iter().any(|e| e.starts_with("rollouts.f.on_failure:")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("rollouts.g.max_p99_increase:")
                && e.contains("`lots` is not a percentage")),
        "{errs:#?}"
    );
    let unknown = errors_of(&with_rollouts(
        "  a: { route: checkout, canary: v2, steps: [100], speed: fast }",
    ));
    assert!(
        unknown.iter().any(|e| e.starts_with("rollouts.a.speed")),
        "{unknown:#?}"
    );
}

#[test]
fn rollout_bounds_are_inclusive_and_names_are_checked() {
    let one = |name: &str, extra: &str| {
        errors_of(&with_rollouts(&format!(
            "  \"{name}\": {{ route: checkout, canary: v2, steps: [100]{extra} }}"
        )))
    };
    assert_eq!(
        one("r", ", interval: 15m, min_p99_increase: 1m"),
        Vec::<String>::new()
    );
    assert_eq!(
        one("r", ", min_p99_increase: 60001ms"),
        ["rollouts.r.min_p99_increase: must be at most 1m"]
    );
    assert_eq!(
        one("r", ", interval: 901s"),
        ["rollouts.r.interval: must be between 2s (proxies report every 2s) and 15m"]
    );
    let long = "n".repeat(128);
    assert_eq!(one(&long, ""), Vec::<String>::new());
    let name_error =
        "a rollout name uses letters, digits, `-`, `_` and `.` only (not first), at most 128";
    for bad in [format!("{long}n"), ".r".to_string(), "r r".to_string()] {
        assert_eq!(one(&bad, ""), [format!("rollouts.{bad}: {name_error}")]);
    }
}
