//! Settings of `tribunal run` and `tribunal cluster` from flags, `TRIBUNAL_*` variables and
//! a TOML file, through the binary (specs/configuration.allium).

use std::path::Path;
use std::process::{Command, Output};

mod support;
use support::tribunal;

/// `tribunal` with no `TRIBUNAL_*` variable from the test's own environment.
fn clean() -> Command {
    let mut command = tribunal();
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TRIBUNAL_") {
            command.env_remove(name);
        }
    }
    command.env("NO_COLOR", "1");
    command
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `name=value (source)` entries of the effective configuration an instance logged.
fn effective(out: &Output) -> String {
    let text = stderr(out);
    let line = text.lines().find(|line| line.contains("effective configuration")).unwrap_or_else(|| panic!("{text}"));
    line.to_owned()
}

// spec: Configuration.SettingResolved (flag over variable over file over default)
// spec: Configuration.EffectiveConfigurationLogged
#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let file = write(
        dir.path(),
        "tribunal.toml",
        &format!("log = \"local:{d}/log\"\ndata_dir = \"{d}/data\"\nexpected-copies = 1\nttl-ms = 1000\nsnapshot-every = 50\n"),
    );
    let out = clean()
        .args(["run", "--config", &file, "--stop-at-end", "--snapshot-every", "7"])
        .env("TRIBUNAL_TTL_MS", "2000")
        .env("TRIBUNAL_SNAPSHOT_EVERY", "9")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let line = effective(&out);
    for expected in [
        "snapshot-every=7 (flag)".to_owned(),
        "ttl-ms=2000 (TRIBUNAL_TTL_MS)".to_owned(),
        format!("expected-copies=1 ({file}:3)"),
        format!("data-dir={d}/data ({file}:2)"),
        "instance-id=1 (default)".to_owned(),
    ] {
        assert!(line.contains(&expected), "{expected} not in {line}");
    }
    assert!(dir.path().join("data").is_dir(), "the file's data-dir was used");

    // TRIBUNAL_CONFIG names the file when --config does not.
    let out = clean().args(["run", "--stop-at-end"]).env("TRIBUNAL_CONFIG", &file).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(effective(&out).contains(&format!("ttl-ms=1000 ({file}:4)")));
}

// spec: Configuration.UnknownFileKeyRefused
#[test]
fn an_unknown_key_in_the_file_is_refused_with_its_line_and_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "t.toml", "log = \"local:/nowhere\"\n\nttl-msec = 5\n");
    let out = clean().args(["run", "--config", &file]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(text.contains(&format!("{file}:3: unknown setting `ttl-msec`")), "{text}");
    assert!(text.contains("ttl-ms, "), "the settings are listed: {text}");
}

// spec: Configuration.BadValueRefused (named as the file and line, the variable, or the flag)
#[test]
fn a_bad_value_names_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let base = format!("log = \"local:{d}/log\"\ndata-dir = \"{d}/data\"\n");
    let cases = [
        (format!("{base}ttl-ms = \"soon\"\n"), None, ":3: `ttl-ms` = \"soon\": invalid value 'soon' for '--ttl-ms"),
        (format!("{base}http = 8080\n"), None, ":3: `http` = \"8080\": invalid value '8080' for '--http"),
        (format!("{base}ttl-ms = {{ a = 1 }}\n"), None, ":3: a table is not a setting's value"),
        (format!("{base}ttl-ms = [1, \nsecret-looking-text\n"), None, "t.toml:4: not TOML"),
        (format!("{base}ttl-ms = [1, 2]\n"), None, ":3: `ttl-ms` takes one value, not a list of 2"),
        (format!("{base}ttl-ms = []\n"), None, ":3: `ttl-ms` takes one value, not a list of 0"),
        (
            base.clone(),
            Some(("TRIBUNAL_EXPECTED_COPIES", "two")),
            "TRIBUNAL_EXPECTED_COPIES=\"two\": invalid value 'two'",
        ),
        (
            base.clone(),
            Some(("TRIBUNAL_TTL_MS", "0")),
            "--ttl-ms must be positive (--ttl-ms \"0\" came from TRIBUNAL_TTL_MS)",
        ),
    ];
    for (text, variable, expected) in cases {
        let file = write(dir.path(), "t.toml", &text);
        let mut command = clean();
        command.args(["run", "--config", &file, "--stop-at-end", "--expected-copies", "1"]);
        if let Some((name, value)) = variable {
            command.env(name, value);
            if name == "TRIBUNAL_EXPECTED_COPIES" {
                // The flag would win over the variable: leave it out.
                command = clean();
                command.args(["run", "--config", &file, "--stop-at-end"]).env(name, value);
            }
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(stderr(&out).contains(expected), "{expected:?} not in {}", stderr(&out));
        assert!(!stderr(&out).contains("secret-looking-text"), "the file's text is never shown");
    }
    let out = clean().args(["run", "--log", "local:/x", "--data-dir", "/x", "--ttl-ms", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid value 'soon' for '--ttl-ms"), "{}", stderr(&out));
}

// spec: Configuration.MissingRequiredSettingRefused
#[test]
fn a_missing_required_setting_says_the_three_ways_to_give_it() {
    let out = clean().args(["run", "--data-dir", "/tmp/never-made"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(text.contains("--log <LOG>"), "{text}");
    assert!(text.contains("TRIBUNAL_") && text.contains("--config"), "{text}");
    assert!(!Path::new("/tmp/never-made").exists());
}

// spec: Configuration.SettingResolved (cluster: its file and variables are its own, not its instances')
#[test]
fn a_cluster_takes_its_settings_from_a_file_and_its_instances_do_not_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let file = write(
        dir.path(),
        "cluster.toml",
        &format!(
            "instances = 1\nexpected-copies = 1\nlog = \"local:{d}/log\"\ndata-dir = \"{d}/c\"\nstop-at-end = true\n"
        ),
    );
    let out = clean().args(["cluster"]).env("TRIBUNAL_CONFIG", &file).env("TRIBUNAL_TTL_MS", "5").output().unwrap();
    // An instance that read the cluster's file would refuse `instances` and never finish.
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains(&format!("instances=1 ({file}:1)")), "{text}");
    let instance_log = std::fs::read_to_string(dir.path().join("c/instance-1/tribunal.log")).unwrap();
    assert!(instance_log.contains("ttl-ms=300000 (default)"), "the cluster's variable did not leak: {instance_log}");
    assert!(!instance_log.contains("cluster.toml"), "{instance_log}");
}

// spec: Configuration.SettingResolved (several values from a file array or a comma-separated variable; a flag beats a bad variable)
// spec: Configuration.EffectiveConfigurationLogged (no secret in it)
#[test]
fn lists_come_from_an_array_or_a_comma_separated_variable_and_no_secret_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let file = write(
        dir.path(),
        "t.toml",
        &format!("log = \"local:{d}/log\"\ndata-dir = \"{d}/data\"\npeers = [\"2@127.0.0.1:1\", \"3@127.0.0.1:2\"]\n"),
    );
    // --expected-copies 9 with two or three peers: refused after parsing, so nothing
    // starts; the configuration was logged first.
    let run = |extra: &[(&str, &str)]| {
        let mut command = clean();
        command.args(["run", "--config", &file, "--expected-copies", "9", "--ttl-ms", "5"]);
        command.env("TRIBUNAL_ADMIN_TOKEN", "a-very-secret-admin-token").env("TRIBUNAL_TTL_MS", "not a number");
        for (name, value) in extra {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let out = run(&[]);
    let text = stderr(&out);
    assert!(text.contains("--expected-copies 9 needs that many instances, and this federation has 3"), "{text}");
    assert!(!text.contains("a-very-secret-admin-token"), "{text}");
    assert!(!text.contains("TRIBUNAL_TTL_MS"), "the flag won, so the bad variable is not an error: {text}");
    let out = run(&[("TRIBUNAL_PEERS", "2@127.0.0.1:1,3@127.0.0.1:2,4@127.0.0.1:3")]);
    assert!(stderr(&out).contains("this federation has 4"), "{}", stderr(&out));
    let out = run(&[("TRIBUNAL_PEERZ", "x")]);
    assert!(stderr(&out).contains("warning: TRIBUNAL_PEERZ is not a setting"), "{}", stderr(&out));
}
