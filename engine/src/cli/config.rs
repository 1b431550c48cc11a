//! Where the settings of `run` and `cluster` come from (specs/configuration.allium): every
//! flag of those commands may also be set by a `TRIBUNAL_*` environment variable or by a
//! TOML file (`--config FILE`, or `TRIBUNAL_CONFIG`). A flag wins over the environment,
//! which wins over the file, which wins over the built-in default.
//!
//! Names are derived from the flag: `--http-deadline-ms` is `TRIBUNAL_HTTP_DEADLINE_MS` and
//! the key `http-deadline-ms` (or `http_deadline_ms`) in the file. clap does the parsing:
//! the variables through its `env` feature, and the file's values as the flags' defaults.
//! Before that, every value from the environment and the file is checked with the flag's
//! own parser, so that an error names where the value came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// The subcommands whose flags are settings.
const CONFIGURED: [&str; 2] = ["run", "cluster"];
/// The flag that names the file (its variable is `TRIBUNAL_CONFIG`).
const CONFIG_FLAG: &str = "config";
/// A config file larger than this is refused (a settings file is a few hundred bytes).
const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// `TRIBUNAL_*` variables that are read, but are not settings of `run` or `cluster`.
const NOT_SETTINGS: [&str; 3] = ["TRIBUNAL_ADMIN_TOKEN", "TRIBUNAL_BIN", "TRIBUNAL_CRASH_SEED"];

/// One setting as the command will use it, for the line logged at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    /// `flag`, the variable's name, `FILE:LINE`, or `default`.
    pub source: String,
}

static EFFECTIVE: OnceLock<Vec<Setting>> = OnceLock::new();

/// The settings of this process's `run` or `cluster`, once the command line is parsed.
pub fn effective() -> &'static [Setting] {
    EFFECTIVE.get().map_or(&[], Vec::as_slice)
}

/// The settings as one line: `name=value (source)`, comma-separated. No secrets: they are
/// files whose paths are settings.
pub fn describe(settings: &[Setting]) -> String {
    let parts: Vec<String> = settings.iter().map(|s| format!("{}={} ({})", s.name, s.value, s.source)).collect();
    parts.join(", ")
}

/// `message` with, for each setting it names as `--NAME` that came from the environment or
/// the config file, where that value came from: a check made after parsing (`--ttl-ms must
/// be positive`) then still names the variable or the file and line.
pub fn annotate(message: &str) -> String {
    let mut out = message.to_owned();
    for setting in effective() {
        let named = format!("--{}", setting.name);
        let from_elsewhere = setting.source != "flag" && setting.source != "default";
        let mentioned = message.match_indices(&named).any(|(at, _)| {
            let next = message[at + named.len()..].chars().next();
            !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if from_elsewhere && mentioned {
            out.push_str(&format!(" ({named} {:?} came from {})", setting.value, setting.source));
        }
    }
    out
}

/// The variable that sets the flag `--long`.
pub fn env_name(long: &str) -> String {
    format!("TRIBUNAL_{}", long.to_uppercase().replace('-', "_"))
}

/// Why the command line could not be parsed.
pub enum Failure {
    /// clap's own: printed and exited by clap (help and version included).
    Clap(clap::Error),
    /// A value from the environment or the file, or the file itself; or a missing
    /// required setting, with the ways to give it.
    Config(String),
}

/// Parses `args` into the command `cmd` describes, with the environment and the config
/// file applied to `run` and `cluster`, and records their effective settings.
pub fn parse(cmd: Command, args: Vec<OsString>) -> Result<ArgMatches, Failure> {
    let sub = args.get(1).and_then(|arg| arg.to_str()).filter(|name| CONFIGURED.contains(name)).map(str::to_owned);
    let Some(sub) = sub else { return cmd.try_get_matches_from(args).map_err(Failure::Clap) };
    let mut cmd = cmd.mut_subcommand(&sub, with_env_names);
    check_environment(&cmd, &sub, &args[2..])?;
    let file = match config_path(&args[2..]) {
        Some(path) => Some(read_file(&path)?),
        None => None,
    };
    if let Some(file) = &file {
        cmd = apply_file(cmd, &sub, file, &args[2..])?;
    }
    let matches = match cmd.clone().try_get_matches_from(args) {
        Ok(matches) => matches,
        Err(error) if error.kind() == clap::error::ErrorKind::MissingRequiredArgument => {
            let hint = "a setting can also be given as its TRIBUNAL_* variable (`--data-dir DIR` as \
                TRIBUNAL_DATA_DIR=DIR) or as a key in the --config file (`data-dir = \"DIR\"`)";
            let rendered = error.render().to_string();
            let rendered = rendered.trim_end().trim_start_matches("error: ");
            return Err(Failure::Config(format!("{rendered}\n{hint}")));
        }
        Err(error) => return Err(Failure::Clap(error)),
    };
    if let Some((_, sub_matches)) = matches.subcommand() {
        let sub_cmd = cmd.find_subcommand(&sub).expect("parsed as this subcommand");
        let _ = EFFECTIVE.set(settings(sub_cmd, sub_matches, file.as_ref()));
    }
    Ok(matches)
}

/// The flags that are settings: every one with a long name, but help and version.
fn setting_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|arg| arg.get_long().is_some_and(|long| long != "help" && long != "version"))
}

fn with_env_names(mut cmd: Command) -> Command {
    let longs: Vec<(String, String)> = setting_args(&cmd)
        .map(|arg| (arg.get_id().to_string(), arg.get_long().expect("filtered").to_owned()))
        .collect();
    for (id, long) in longs {
        cmd = cmd.mut_arg(id, |arg| arg.env(env_name(&long)));
    }
    cmd
}

/// Whether the argument `arg` gives the flag `flag` (`--name`): as `--name` or `--name=VALUE`.
pub fn names_flag(arg: &str, flag: &str) -> bool {
    arg == flag || arg.strip_prefix(flag).is_some_and(|rest| rest.starts_with('='))
}

/// Whether `--long` is among the subcommand's arguments (before `--`): then it wins, and
/// the variable and the file are not looked at for it.
fn on_command_line(args: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    args.iter().take_while(|arg| *arg != "--").any(|arg| names_flag(&arg.to_string_lossy(), &flag))
}

/// Checks every `TRIBUNAL_*` variable that sets a flag of `sub` with that flag's parser (a
/// flag given on the command line wins, so its variable is not checked), and warns of
/// `TRIBUNAL_*` variables that set nothing: a misspelt one would otherwise go unnoticed.
fn check_environment(cmd: &Command, sub: &str, args: &[OsString]) -> Result<(), Failure> {
    let sub_cmd = cmd.find_subcommand(sub).expect("a configured subcommand");
    let known: Vec<String> = setting_args(sub_cmd).map(|arg| env_name(arg.get_long().expect("filtered"))).collect();
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("TRIBUNAL_") && !known.iter().any(|known| known == name) && !NOT_SETTINGS.contains(&name) {
            eprintln!("tribunal {sub}: warning: {name} is not a setting of `tribunal {sub}` and is ignored");
        }
    }
    for arg in setting_args(sub_cmd) {
        let long = arg.get_long().expect("filtered");
        let name = env_name(long);
        let Some(value) = std::env::var_os(&name) else { continue };
        if on_command_line(args, long) {
            continue;
        }
        for part in split(arg, &value.to_string_lossy()) {
            check_value(arg, &part).map_err(|reason| Failure::Config(format!("{name}={part:?}: {reason}")))?;
        }
    }
    Ok(())
}

/// The values of one setting given as one text: split at the flag's delimiter, if any.
fn split(arg: &Arg, text: &str) -> Vec<String> {
    match arg.get_value_delimiter() {
        Some(delimiter) => text.split(delimiter).map(str::to_owned).collect(),
        None => vec![text.to_owned()],
    }
}

/// Checks one value with the flag's own parser, by parsing `--long=value` against that
/// flag alone (its default, variable and requirement cleared).
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().expect("a setting has a long name");
    let alone = arg
        .clone()
        .action(ArgAction::Set)
        .num_args(1)
        .required(false)
        .default_value(None)
        .env(None)
        .value_delimiter(None);
    let check = Command::new("check").no_binary_name(true).disable_help_flag(true).arg(alone);
    match check.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        Err(error) => {
            let rendered = error.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            Err(first.trim_start_matches("error: ").to_owned())
        }
    }
}

/// `--config FILE` or `--config=FILE` among the subcommand's arguments (before `--`), or
/// else `TRIBUNAL_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let flag = format!("--{CONFIG_FLAG}");
    let mut args = args.iter().take_while(|arg| *arg != "--");
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix(&format!("{flag}=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(env_name(CONFIG_FLAG)).map(PathBuf::from)
}

/// A config file: each key's values and the line it is on.
struct ConfigFile {
    path: PathBuf,
    entries: BTreeMap<String, (Vec<String>, usize)>,
}

fn read_file(path: &PathBuf) -> Result<ConfigFile, Failure> {
    let fail = |reason: String| Failure::Config(format!("config file {}: {reason}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut text = String::new();
    // `take`: a device or a pipe has no size to check beforehand.
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG_FILE_BYTES + 1), &mut text)
        .map_err(|e| fail(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(fail(format!("more than the {MAX_CONFIG_FILE_BYTES} bytes allowed")));
    }
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    type Spanned<T> = toml::Spanned<T>;
    // The error's message and line, never the text of the line: a file named by mistake
    // (a secret) must not end up in a log.
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(String::new(), |span| format!(":{}", line_of(span.start)));
        Failure::Config(format!("config file {}{line}: not TOML: {}", path.display(), e.message()))
    })?;
    let mut entries = BTreeMap::new();
    for (key, value) in table {
        let line = line_of(key.span().start);
        let name = key.into_inner().replace('_', "-");
        let at = |reason: String| Failure::Config(format!("{}:{line}: {reason}", path.display()));
        let values = match value.into_inner() {
            toml::Value::Array(items) => items.into_iter().map(scalar).collect::<Result<Vec<_>, _>>().map_err(&at)?,
            other => vec![scalar(other).map_err(&at)?],
        };
        if entries.insert(name.clone(), (values, line)).is_some() {
            return Err(at(format!("`{name}` is set twice (as `-` and `_`)")));
        }
    }
    Ok(ConfigFile { path: path.clone(), entries })
}

fn scalar(value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        other => {
            Err(format!("a {} is not a setting's value (a string, number, boolean or array of them)", other.type_str()))
        }
    }
}

/// Makes the file's values the defaults of `sub`'s flags, after checking each with its
/// flag's parser. An unknown key is an error that lists the settings.
fn apply_file(mut cmd: Command, sub: &str, file: &ConfigFile, args: &[OsString]) -> Result<Command, Failure> {
    let sub_cmd = cmd.find_subcommand(sub).expect("a configured subcommand").clone();
    for (name, (values, line)) in &file.entries {
        let at = |reason: String| Failure::Config(format!("{}:{line}: {reason}", file.path.display()));
        let arg = setting_args(&sub_cmd).find(|arg| arg.get_long() == Some(name.as_str()) && name != CONFIG_FLAG);
        let Some(arg) = arg else {
            let known: Vec<&str> =
                setting_args(&sub_cmd).filter_map(Arg::get_long).filter(|long| *long != CONFIG_FLAG).collect();
            return Err(at(format!(
                "unknown setting `{name}` for `tribunal {sub}`; the settings are: {}",
                known.join(", ")
            )));
        };
        let multiple = matches!(arg.get_action(), ArgAction::Append) || arg.get_value_delimiter().is_some();
        if values.is_empty() || (values.len() > 1 && !multiple) {
            return Err(at(format!("`{name}` takes one value, not a list of {}", values.len())));
        }
        if env_or_flag_wins(arg, args) {
            continue;
        }
        let values: Vec<String> = values.iter().flat_map(|value| split(arg, value)).collect();
        for value in &values {
            check_value(arg, value).map_err(|reason| at(format!("`{name}` = {value:?}: {reason}")))?;
        }
        let id = arg.get_id().clone();
        cmd = cmd.mut_subcommand(sub, |sub_cmd| {
            sub_cmd.mut_arg(id, |arg| arg.required(false).default_values(values.clone()))
        });
    }
    Ok(cmd)
}

/// A flag on the command line, or its variable, wins over the file's value.
fn env_or_flag_wins(arg: &Arg, args: &[OsString]) -> bool {
    let long = arg.get_long().expect("a setting has a long name");
    on_command_line(args, long) || std::env::var_os(env_name(long)).is_some()
}

/// Every setting that has a value, with its source.
fn settings(cmd: &Command, matches: &ArgMatches, file: Option<&ConfigFile>) -> Vec<Setting> {
    let mut out = Vec::new();
    for arg in setting_args(cmd) {
        let id = arg.get_id().as_str();
        let long = arg.get_long().expect("filtered");
        let (Some(source), Some(raw)) = (matches.value_source(id), matches.get_raw(id)) else { continue };
        let value = raw.map(|value| value.to_string_lossy().into_owned()).collect::<Vec<_>>().join(",");
        let source = match source {
            ValueSource::CommandLine => "flag".to_owned(),
            ValueSource::EnvVariable => env_name(long),
            _ => match file.and_then(|file| file.entries.get(long).map(|(_, line)| (file, line))) {
                Some((file, line)) => format!("{}:{line}", file.path.display()),
                None => "default".to_owned(),
            },
        };
        out.push(Setting { name: long.to_owned(), value, source });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
