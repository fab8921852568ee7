//! What mutation testing (`cargo mutants`, README "Testing") found untested in spur-config:
//! values at the bounds of a range, rules no other test reached, the library entry points.

use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

/// A config of one http listener (extra listener fields `l`) and one cluster (extra
/// cluster fields `c`), both given as YAML flow-map entries.
fn config(l: &str, c: &str) -> String {
    format!(
        "listeners: [{{ name: l, listen: 127.0.0.1:1, cluster: c{l} }}]\n\
         clusters: [{{ name: c, endpoints: [\"127.0.0.1:2\"]{c} }}]\n"
    )
}

#[track_caller]
fn assert_errors(yaml: &str, expected: &[&str]) {
    assert_eq!(errors_of(yaml), expected, "{yaml}");
}

#[test]
fn a_range_includes_its_upper_bound() {
    let health = |n: u32| {
        config(
            "",
            &format!(", health_check: {{ path: /h, unhealthy_threshold: {n} }}"),
        )
    };
    assert_errors(&health(100), &[]);
    assert_errors(
        &health(101),
        &["clusters[0].health_check.unhealthy_threshold: must be between 1 and 100"],
    );
}

#[test]
fn tls_files_must_be_named() {
    assert_errors(
        &config(", tls: { cert: \" \", key: k.pem, client_ca: \"\" }", ""),
        &[
            "listeners[0].tls.cert: must name a file",
            "listeners[0].tls.client_ca: must name a file",
        ],
    );
}

#[test]
fn a_destination_match_needs_an_original_dst_listener() {
    let routes = |extra: &str| {
        config(
            &format!(", routes: [{{ match: {{ destination: c }}, cluster: c }}]{extra}"),
            "",
        )
    };
    assert_errors(
        &routes(""),
        &["listeners[0].routes[0].match.destination: only applies on a listener with original_dst (the destination is the connection's original one)"],
    );
    assert_errors(&routes(", original_dst: true"), &[]);
}

#[test]
fn service_addresses_need_a_port() {
    assert_errors(
        &config("", ", service_addresses: [\"10.0.0.1:80\", \"10.0.0.2:0\"]"),
        &["clusters[0].service_addresses[1]: port 0 is not a destination"],
    );
}

#[test]
fn every_breaker_setting_is_checked() {
    assert_errors(
        &config(
            "",
            ", circuit_breaker: { consecutive_failures: 0, ejection_time: 0ms, max_ejection_percent: 101, max_requests: 0, max_pending: 1000001 }",
        ),
        &[
            "clusters[0].circuit_breaker.consecutive_failures: must be between 1 and 1000",
            "clusters[0].circuit_breaker.ejection_time: must be greater than 0ms",
            "clusters[0].circuit_breaker.max_ejection_percent: must be between 0 and 100",
            "clusters[0].circuit_breaker.max_requests: must be between 1 and 1000000",
            "clusters[0].circuit_breaker.max_pending: must be between 0 and 1000000",
        ],
    );
    assert_errors(
        &config(
            "",
            ", circuit_breaker: { consecutive_failures: 1000, max_ejection_percent: 100, max_requests: 1000000, max_pending: 0 }",
        ),
        &[],
    );
}

#[test]
fn a_rate_limit_period_is_at_most_a_day() {
    let per = |per: &str| config(&format!(", rate_limit: {{ requests: 5, per: {per} }}"), "");
    assert_errors(&per("24h"), &[]);
    assert_errors(
        &per("1441m"),
        &["listeners[0].rate_limit.per: must be at most 24h"],
    );
}

/// A config whose one route (fields `r`, given as flow-map entries) has no cluster.
fn route(r: &str) -> String {
    config(
        &format!(", routes: [{{ match: {{ path_prefix: /a }}{r} }}]"),
        "",
    )
}

#[test]
fn a_redirect_changing_any_one_part_is_enough() {
    for part in [
        "scheme: https",
        "host: example.com",
        "port: 8443",
        "path: /b",
        "path_prefix: /b/",
    ] {
        assert_errors(&route(&format!(", redirect: {{ {part} }}")), &[]);
    }
}

#[test]
fn a_path_has_no_query_fragment_space_or_control_character() {
    for (path, ok) in [
        ("/a/b-c_d~e", true),
        ("/a?x", false),
        ("/a#x", false),
        ("/a b", false),
        ("/a\\tb", false),
        ("/a\\u007fb", false),
        ("/caf\\u00e9", false),
    ] {
        let yaml = route(&format!(", redirect: {{ path: \"{path}\" }}"));
        let errs = errors_of(&yaml);
        assert_eq!(errs.is_empty(), ok, "{path}: {errs:?}");
        assert!(
            ok || errs[0]
                .ends_with("is not a path (no query, fragment, spaces or control characters)"),
            "{errs:?}"
        );
    }
}

#[test]
fn header_rules_need_only_one_of_set_add_and_remove() {
    for rules in ["set: { x-a: b }", "add: { x-a: b }", "remove: [x-a]"] {
        let yaml = route(&format!(", cluster: c, request_headers: {{ {rules} }}"));
        assert_errors(&yaml, &[]);
    }
}

#[test]
fn cors_max_age_and_slow_start_are_bounded_inclusively() {
    let cors = |age: &str| {
        route(&format!(
            ", cluster: c, cors: {{ allow_origins: [\"https://a.example\"], max_age: {age} }}"
        ))
    };
    assert_errors(&cors("24h"), &[]);
    assert_errors(
        &cors("1441m"),
        &["listeners[0].routes[0].cors.max_age: must be at most 24h"],
    );
    let slow = |w: &str| config("", &format!(", slow_start: {{ window: {w} }}"));
    assert_errors(&slow("1h"), &[]);
    assert_errors(
        &slow("61m"),
        &["clusters[0].slow_start.window: must be at most 1h"],
    );
}

#[test]
fn a_specific_ipv6_address_does_not_take_the_port_on_ipv4() {
    let yaml = "listeners:\n\
        \x20 - { name: a, listen: \"[::1]:8080\", cluster: c }\n\
        \x20 - { name: b, listen: \"127.0.0.1:8080\", cluster: c }\n\
        \x20 - { name: d, listen: \"[::2]:8080\", cluster: c }\n\
        clusters: [{ name: c, endpoints: [\"127.0.0.1:2\"] }]\n";
    assert_errors(yaml, &[]);
}

#[test]
fn retry_bounds_are_inclusive() {
    let retry = |r: &str| route(&format!(", cluster: c, retry: {{ attempts: 2, {r} }}"));
    assert_errors(
        &retry("backoff: { base: 1s, max: 1s }, max_body: 64MiB"),
        &[],
    );
    assert_errors(
        &retry("max_body: 67108865"),
        &["listeners[0].routes[0].retry.max_body: must be at most 64MiB"],
    );
}

#[test]
fn a_host_match_is_a_host_name() {
    let host = |h: &str| {
        config(
            &format!(", routes: [{{ match: {{ host: \"{h}\" }}, cluster: c }}]"),
            "",
        )
    };
    assert_errors(&host("shop.example"), &[]);
    for bad in ["", "a/b", "a b"] {
        assert_errors(
            &host(bad),
            &[&format!(
                "listeners[0].routes[0].match.host: `{bad}` is not a host name"
            )],
        );
    }
}

#[test]
fn a_fault_abort_status_is_between_200_and_599() {
    let abort = |status: u16| {
        route(&format!(
            ", cluster: c, fault: {{ abort: {{ percent: 10, status: {status} }} }}"
        ))
    };
    assert_errors(&abort(200), &[]);
    assert_errors(&abort(599), &[]);
    assert_errors(
        &abort(600),
        &["listeners[0].routes[0].fault.abort.status: must be between 200 and 599"],
    );
}

/// A file in the temporary directory, unique to this process and test.
fn temp_file(name: &str, content: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("spur-config-{}-{name}", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn the_library_entry_points_check_what_they_are_given() {
    // check_depth: for documents from the network.
    let deep = format!(
        "{}1{}",
        "[".repeat(MAX_DEPTH + 1),
        "]".repeat(MAX_DEPTH + 1)
    );
    assert!(check_depth(&deep, Format::Json).is_err());
    assert!(check_depth("[[1]]", Format::Json).is_ok());
    // validate and validate_with: a config changed after it was loaded.
    let mut cfg = load(&config("", ""), None).unwrap();
    assert_eq!(validate(&cfg), Ok(()));
    cfg.workers = Some(0);
    let err = validate(&cfg).unwrap_err();
    assert_eq!(err.to_string(), "workers: must be between 1 and 1024");
    assert_eq!(validate_with(&cfg, Rules::default()), Err(err));
    // Several errors print one a line.
    let two = load("node: \" \"\nworkers: 0\n", None).unwrap_err();
    assert_eq!(
        two.to_string(),
        "node: must not be empty\nworkers: must be between 1 and 1024"
    );
}

#[test]
fn files_are_read_and_named_in_errors() {
    let good = temp_file("good.yaml", &config("", ""));
    assert_eq!(
        load_file(&good).unwrap(),
        load(&config("", ""), None).unwrap()
    );
    let bad = temp_file("bad.yaml", "workers: 0\n");
    assert_eq!(
        load_file_with(&bad, Rules::default())
            .unwrap_err()
            .to_string(),
        "workers: must be between 1 and 1024"
    );
    let missing = std::env::temp_dir().join("spur-config-no-such-file.yaml");
    let err = load_file(&missing).unwrap_err().to_string();
    assert!(err.starts_with("cannot read "), "{err}");
    let token = temp_file("token", "  s3cret\n");
    assert_eq!(read_token_file(&token).unwrap(), "s3cret");
    let empty = temp_file("empty-token", " \n");
    assert!(read_token_file(&empty).unwrap_err().ends_with("is empty"));
    assert!(read_token_file(&missing).is_err());
    for p in [good, bad, token, empty] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn an_endpoint_weighs_one_unless_it_says() {
    let cfg = load(
        &config("", "").replace(
            "endpoints: [\"127.0.0.1:2\"]",
            "endpoints: [\"127.0.0.1:2\", { address: \"127.0.0.1:3\", weight: 7 }]",
        ),
        None,
    )
    .unwrap();
    let weights: Vec<u32> = cfg.clusters[0]
        .endpoints
        .iter()
        .map(|e| e.weight())
        .collect();
    assert_eq!(weights, [1, 7]);
}

#[test]
fn an_endpoint_that_is_not_an_address_says_what_would_be() {
    let endpoints = |e: &str| config("", "").replace("endpoints: [\"127.0.0.1:2\"]", e);
    // A host name without a port, or with spaces, is not taken for a `dns:` target.
    for (e, text) in [
        ("endpoints: [localhost]", "localhost"),
        ("endpoints: [\"a b:80\"]", "a b:80"),
    ] {
        assert_errors(
            &endpoints(e),
            &[&format!(
                "clusters[0].endpoints[0]: `{text}` is not an IP address with a port such as 127.0.0.1:8080"
            )],
        );
    }
    let errs = errors_of(&endpoints("endpoints: [[1]]"));
    assert!(
        errs[0].contains(
            "expected an IP address with a port such as 127.0.0.1:8080, or { address, weight }"
        ),
        "{errs:?}"
    );
}

#[test]
fn percentages_and_where_a_rollout_is() {
    use crate::rollout::locate;
    assert_eq!(Percent(1.0).fraction(), 0.01);
    assert_eq!(Percent(250.0).fraction(), 2.5);
    assert!("inf%".parse::<Percent>().is_err());
    assert!("NaN".parse::<Percent>().is_err());
    assert_eq!(
        serde_json::from_str::<Percent>("0.5").unwrap(),
        Percent(0.5)
    );
    let e = serde_json::from_str::<Percent>("true")
        .unwrap_err()
        .to_string();
    assert!(e.contains("a percentage such as `1%` or `20`"), "{e}");
    let yaml = "listeners:\n\
        \x20 - { name: a, listen: 127.0.0.1:1, cluster: c }\n\
        \x20 - name: b\n\
        \x20   listen: 127.0.0.1:2\n\
        \x20   routes:\n\
        \x20     - { name: x, cluster: c }\n\
        \x20     - { name: r, split: [{ cluster: c, weight: 1 }, { cluster: d, weight: 1 }, { cluster: e, weight: 1 }] }\n\
        clusters:\n\
        \x20 - { name: c, endpoints: [\"127.0.0.1:3\"] }\n\
        \x20 - { name: d, endpoints: [\"127.0.0.1:4\"] }\n\
        \x20 - { name: e, endpoints: [\"127.0.0.1:5\"] }\n\
        rollouts:\n\
        \x20 r: { route: r, canary: e, steps: [100] }\n";
    let cfg = load(yaml, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(locate(&cfg, &cfg.rollouts["r"]), Some((1, 1, 2)));
}

#[test]
fn cors_origins_match_exactly_what_they_say() {
    let origin = |t: &str| OriginPattern::parse_value(t);
    let sub = origin("https://*.example.com").unwrap();
    assert!(sub.matches("https://a.example.com"));
    assert!(sub.matches("https://a.b-c.example.com"));
    for no in [
        "https://example.com",
        "https://.example.com",
        "https://a_b.example.com",
        "https://a.example.com:8443",
        "http://a.example.com",
    ] {
        assert!(!sub.matches(no), "{no}");
    }
    for (bad, why) in [
        ("https://a.com/x", "an origin has no path"),
        ("https://", "an origin has no path"),
        (
            "https://*.com",
            "`*.` is followed by a domain of two labels or more",
        ),
        ("https://a_b.com", "the host is not a host name"),
        ("https://[abc", "the host is not a host name"),
    ] {
        let e = origin(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    assert!(origin("https://[::1]:8080").is_ok());
}

#[test]
fn the_default_access_log_is_left_out_when_written_back() {
    let cfg = load(&config("", ""), None).unwrap();
    let json = serde_json::to_value(&cfg).unwrap();
    assert!(json.get("access_log").is_none(), "{json}");
    let logged = load(
        &format!("access_log: {{ query: true }}\n{}", config("", "")),
        None,
    )
    .unwrap();
    let json = serde_json::to_string(&logged).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), logged);
}

#[test]
fn grpc_failures_are_the_server_side_codes() {
    let codes = GrpcCode::default_failures();
    assert_eq!(codes.len(), 5);
    assert!(codes.contains(&GrpcCode::UNAVAILABLE) && !codes.contains(&GrpcCode::CANCELLED));
}

#[test]
fn header_rules_redirect_hosts_and_schemes() {
    assert_errors(
        &route(", cluster: c, request_headers: {}"),
        &["listeners[0].routes[0].request_headers: needs set, add or remove"],
    );
    // (Read from JSON directly, as a pushed config is: the file reader words its own.)
    let e = serde_json::from_str::<HeaderValues>("[1]")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a map of header names to values (`x-env: prod`)"),
        "{e}"
    );
    for host in ["u@h", "a/b", ""] {
        assert!(HostName::parse_value(host).is_err(), "{host} accepted");
    }
    assert!(HostName::parse_value("api.internal:8080").is_ok());
    assert_eq!(
        (
            RedirectScheme::Http.as_str(),
            RedirectScheme::Https.as_str()
        ),
        ("http", "https")
    );
    let otlp = crate::OtlpEndpoint::parse_value("http://collector:4317").unwrap();
    assert_eq!(otlp.to_string(), "http://collector:4317/");
}

#[test]
fn parse_alone_refuses_what_does_not_parse() {
    assert_eq!(
        parse(&config("", ""), Format::Yaml).unwrap(),
        load(&config("", ""), None).unwrap()
    );
    assert!(parse("listeners: 5\n", Format::Yaml).is_err());
    assert!(parse("{", Format::Json).is_err());
}

#[test]
fn a_syntax_error_names_the_format() {
    let json = load("{", Some("c.json")).unwrap_err().to_string();
    assert!(json.starts_with("not valid JSON: "), "{json}");
    let yaml = load("a: [", Some("c.yaml")).unwrap_err().to_string();
    assert!(yaml.starts_with("not valid YAML: "), "{yaml}");
}

#[test]
fn parsing_stops_after_a_hundred_errors() {
    let listeners: String = (0..150)
        .map(|i| format!("  - {{ name: l{i}, listen: bad, cluster: c }}\n"))
        .collect();
    let errs = errors_of(&format!("listeners:\n{listeners}"));
    assert_eq!(errs.len(), 101, "{:?}", errs.last());
    assert_eq!(errs[100], "stopped after 100 errors; fix these first");
}

#[test]
fn a_tag_anywhere_is_refused_at_its_path() {
    let yaml = "node: !t n\nlisteners:\n  - !t { name: l }\n  - { name: m, listen: !t x }\n";
    let errs = errors_of(yaml);
    for path in ["node", "listeners[0]", "listeners[1].listen"] {
        let want = format!("{path}: YAML tags (`!name`) are not used in a Spur config");
        assert!(errs.contains(&want), "{want} not in {errs:#?}");
    }
}

#[test]
fn a_tree_of_exactly_the_depth_limit_is_read() {
    // A map and 63 lists: 64 levels, the most allowed.
    let text = format!("x: {}{}", "[".repeat(63), "]".repeat(63));
    let errs = errors_of(&text);
    assert!(
        !errs.iter().any(|e| e.contains("nested more than")),
        "{errs:?}"
    );
    let deeper = format!("x: {}{}", "[".repeat(64), "]".repeat(64));
    assert_eq!(
        errors_of(&deeper),
        ["the document is nested more than 64 levels deep"]
    );
}
