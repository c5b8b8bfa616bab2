use super::*;

#[test]
fn webhook_hosts_are_matched_exactly_or_by_domain() {
    let list = vec![
        "hooks.example.com".to_owned(),
        "*.corp".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for (url, ok) in [
        ("https://hooks.example.com/x", true),
        ("https://HOOKS.example.com:8443/x", true),
        ("https://evil.hooks.example.com/x", false),
        ("https://hooks.example.com.evil/x", false),
        ("http://a.corp/x", true),
        ("http://corp/x", false),
        ("http://x.evilcorp/x", false),
        ("http://127.0.0.1:9000/x", true),
        ("http://[::1]:9000/x", true),
        ("http://127.0.0.2/x", false),
    ] {
        let host = url_host(url).unwrap();
        assert_eq!(host_allowed(&host, &list), ok, "{url}");
    }
    assert_eq!(url_host("http://u:p@x/"), None);
    assert_eq!(url_host("ftp://x/"), None);
    assert_eq!(url_host("http:///x"), None);
}

#[test]
fn empty_text_gives_the_defaults() {
    assert_eq!(Config::from_toml("", "t").unwrap(), Config::default());
}

#[test]
fn bad_values_and_unknown_keys_are_named() {
    for (text, needle) in [
        ("[tasks]\nmax_parallel = 0", "max_parallel"),
        ("[audit]\nkeep_days = 0", "[audit] keep_days"),
        ("[audit]\nkeep_max = 10", "[audit] keep_max"),
        ("[audit]\nkeep = 10", "keep"),
        ("[server]\nlisten = \"nowhere\"", "listen"),
        ("[server]\nlog_level = \"loud\"", "log_level"),
        ("[server]\nlog_format = \"xml\"", "log_format"),
        (
            "[alerts]\ncapacity_warn_percent = 0",
            "capacity_warn_percent",
        ),
        ("[[alerts.webhook]]\nurl = \"ftp://x\"", "url"),
        (
            "[[alerts.webhook]]\nurl = \"http://evil.example/x\"",
            "not in [alerts] allowed_hosts",
        ),
        (
            "[alerts]\nallowed_hosts = [\"*.example\"]\n[[alerts.webhook]]\nurl = \"http://a:b@x.example/\"",
            "credentials",
        ),
        (
            "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x/\"\nsecret = \"short\"",
            "at least 16",
        ),
        ("[alerts]\nretry_seconds = [0]", "retry_seconds"),
        (
            "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x\"\ntimeout_seconds = 0",
            "timeout_seconds",
        ),
        ("[server]\nlisen = \"1.2.3.4:5\"", "lisen"),
        ("[hooks.db]\ntimeout_seconds = 5", "freeze or a thaw"),
        ("[hooks.db]\nfreeze = \"x\"\nrun = \"y\"", "run"),
        ("[hooks.\"a b\"]\nfreeze = \"x\"", "hook set name"),
        ("[server]\nmax_connections = 0", "max_connections"),
        ("[live]\nscratch_dir = \"rel/dir\"", "scratch_dir"),
        (
            "[server]\nheader_timeout_seconds = 0",
            "header_timeout_seconds",
        ),
        ("[alerts]\nqueue = 0", "queue"),
        (
            "[server]\nlisten = \"0.0.0.0:8420\"\nplain_http = true",
            "loopback",
        ),
        ("[server]\ntls_cert = \"/c.pem\"", "tls_key"),
        (
            "[server]\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
            "relative",
        ),
        ("[alerts]\nworkers = 17", "workers"),
        ("[keys]\nmain = \"rel.key\"", "absolute"),
        (
            "[alerts]\nallowed_hosts = [\"x\"]\n[[alerts.webhook]]\nurl = \"http://x\"\nevents = [\"nope\"]",
            "nope",
        ),
    ] {
        let e = Config::from_toml(text, "t.toml").unwrap_err();
        assert!(e.contains(needle) && e.starts_with("t.toml"), "{text}: {e}");
    }
}

#[test]
fn the_example_config_loads_and_sets_every_option() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/blockvault.toml");
    let c = Config::load(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for key in [
        "listen",
        "data",
        "log_level",
        "log_format",
        "shutdown_grace_seconds",
        "max_connections",
        "header_timeout_seconds",
        "plain_http",
        "max_parallel",
        "enabled",
        "gc_after_prune",
        "capacity_warn_percent",
        "queue",
        "workers",
        "url",
        "events",
        "timeout_seconds",
        "allowed_hosts",
        "retry_seconds",
        "freeze",
        "thaw",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key} ="))),
            "the example does not set {key}"
        );
    }
    assert_eq!((c.audit_keep_days, c.audit_keep_max), (365, 1_000_000));
    assert_eq!(c.webhooks.len(), 1);
    assert_eq!(c.alert_retry_seconds, vec![5, 30, 120, 600, 3600]);
    assert!(c.hooks["postgres"].freeze.is_some() && c.hooks["postgres"].thaw.is_some());
    assert_eq!(c.data, PathBuf::from("/var/lib/blockvault"));
    // The shipped file serves HTTPS with the self-signed certificate.
    assert!(!c.plain_http && c.tls_cert.is_none());
    for key in ["tls_cert", "tls_key"] {
        assert!(text.contains(&format!("#{key} = ")), "{key} is not shown");
    }
}
