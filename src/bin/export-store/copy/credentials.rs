//! AWS credentials and region for `export-store copy`, found the way the
//! AWS SDKs and CLI find them, in this order:
//!
//! 1. the environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!    `AWS_SESSION_TOKEN`;
//! 2. the shared files' profile (`AWS_PROFILE`, else `default`):
//!    `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`
//!    from `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`) or
//!    `~/.aws/config` (`AWS_CONFIG_FILE`);
//! 3. web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`), the
//!    ECS task role (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`), then the EC2
//!    instance role (unless `AWS_EC2_METADATA_DISABLED=true`), which the S3
//!    client (object_store) fetches and refreshes itself.
//!
//! A profile that gets its keys some other way (`role_arn`, `sso_*`,
//! `credential_process`) is refused with a message that says how to hand
//! its keys over through the environment, rather than silently falling
//! through to the instance role. The region comes from `--region`, else
//! `AWS_REGION` / `AWS_DEFAULT_REGION`, else the profile's `region`, else
//! `us-east-1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Static keys, from the environment or a profile.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    /// `aws_access_key_id`.
    pub access_key_id: String,
    /// `aws_secret_access_key`.
    pub secret_access_key: String,
    /// `aws_session_token`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Keys")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Static keys, and where they were found (for the summary).
    Keys(Keys, String),
    /// The S3 client's own providers: web identity, ECS task role or EC2
    /// instance role.
    Role(&'static str),
}

/// What the chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The credentials' source.
    pub source: Source,
    /// The region.
    pub region: String,
}

impl Resolved {
    /// Where the credentials come from, for messages (never a secret).
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Keys(keys, from) => format!("access key {} from {from}", keys.access_key_id),
            Source::Role(what) => what.to_string(),
        }
    }
}

/// The process environment the chain reads (a seam for the unit tests).
pub trait Env {
    /// A variable's value; `None` when unset or empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

/// Runs the chain; `region` is `--region`.
pub fn resolve(env: &dyn Env, region: Option<&str>) -> Result<Resolved, String> {
    let profile_name = env.var("AWS_PROFILE");
    let explicit_profile = profile_name.is_some();
    let profile_name = profile_name.unwrap_or_else(|| "default".to_string());
    let home = env.var("HOME").map(PathBuf::from);
    let credentials_file = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
    let config_file = env
        .var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
    let from_credentials = read_profile(credentials_file.as_deref(), &profile_name, false)?;
    let from_config = read_profile(config_file.as_deref(), &profile_name, true)?;

    let region = region
        .map(str::to_string)
        .or_else(|| env.var("AWS_REGION"))
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .or_else(|| from_config.as_ref().and_then(|p| p.get("region").cloned()))
        .or_else(|| {
            from_credentials
                .as_ref()
                .and_then(|p| p.get("region").cloned())
        })
        .unwrap_or_else(|| "us-east-1".to_string());

    match (
        env.var("AWS_ACCESS_KEY_ID"),
        env.var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(access_key_id), Some(secret_access_key)) => {
            let keys = Keys {
                access_key_id,
                secret_access_key,
                session_token: env.var("AWS_SESSION_TOKEN"),
            };
            return Ok(Resolved {
                source: Source::Keys(keys, "the environment".into()),
                region,
            });
        }
        (Some(_), None) => {
            return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
        }
        (None, Some(_)) => {
            return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
        }
        (None, None) => {}
    }

    for (profile, file) in [
        (&from_credentials, &credentials_file),
        (&from_config, &config_file),
    ] {
        let (Some(profile), Some(file)) = (profile, file) else {
            continue;
        };
        let where_ = format!("profile {profile_name} in {}", file.display());
        match (
            profile.get("aws_access_key_id"),
            profile.get("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) => {
                let keys = Keys {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: profile.get("aws_session_token").cloned(),
                };
                return Ok(Resolved {
                    source: Source::Keys(keys, where_),
                    region,
                });
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(format!(
                    "{where_} has only one of aws_access_key_id and aws_secret_access_key"
                ))
            }
            (None, None) => {}
        }
        if let Some(how) = [
            "role_arn",
            "sso_session",
            "sso_start_url",
            "credential_process",
        ]
        .into_iter()
        .find(|k| profile.contains_key(*k))
        {
            return Err(format!(
                "{where_} gets its credentials through `{how}`, which export-store copy \
                 does not run; hand them over in the environment instead: \
                 eval \"$(aws configure export-credentials --profile {profile_name} --format env)\""
            ));
        }
    }
    if explicit_profile && from_credentials.is_none() && from_config.is_none() {
        return Err(format!(
            "AWS_PROFILE={profile_name}, but no such profile in {} or {}",
            show(credentials_file.as_deref()),
            show(config_file.as_deref())
        ));
    }

    if env.var("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() && env.var("AWS_ROLE_ARN").is_some() {
        return Ok(Resolved {
            source: Source::Role("web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN)"),
            region,
        });
    }
    if env.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some() {
        return Ok(Resolved {
            source: Source::Role("the ECS task role"),
            region,
        });
    }
    if env
        .var("AWS_EC2_METADATA_DISABLED")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Err(no_credentials(&profile_name));
    }
    Ok(Resolved {
        source: Source::Role("the EC2 instance role"),
        region,
    })
}

/// The message when the chain found nothing.
pub fn no_credentials(profile: &str) -> String {
    format!(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
         AWS_PROFILE to a profile with keys (now: {profile}), or run with an instance or task role"
    )
}

fn show(p: Option<&Path>) -> String {
    p.map_or_else(|| "(no HOME)".to_string(), |p| p.display().to_string())
}

/// One profile's keys from an INI file: `[NAME]` in the credentials file;
/// `[profile NAME]` (or `[default]`) in the config file. `None` when the
/// file or the section is missing.
fn read_profile(
    file: Option<&Path>,
    name: &str,
    config: bool,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let Some(file) = file else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    Ok(parse_profile(&text, name, config))
}

/// The INI subset the AWS files use: `[section]`, `key = value`, `#` and
/// `;` comments; indented lines (nested `s3 =` settings) are skipped.
fn parse_profile(text: &str, name: &str, config: bool) -> Option<BTreeMap<String, String>> {
    let mut found: Option<BTreeMap<String, String>> = None;
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let section = if config && section != "default" {
                match section.strip_prefix("profile") {
                    Some(rest) if rest.starts_with(char::is_whitespace) => rest.trim(),
                    _ => "",
                }
            } else {
                section
            };
            inside = section == name;
            if inside {
                found.get_or_insert_with(BTreeMap::new);
            }
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim();
                if !v.is_empty() {
                    if let Some(map) = found.as_mut() {
                        map.insert(k.trim().to_ascii_lowercase(), v.to_string());
                    }
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    struct MapEnv(BTreeMap<&'static str, String>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env(vars: &[(&'static str, &str)]) -> MapEnv {
        MapEnv(vars.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    #[test]
    fn the_environment_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credentials"),
            "[default]\naws_access_key_id = FILE\naws_secret_access_key = s\n",
        )
        .unwrap();
        let creds = dir.path().join("credentials");
        let e = env(&[
            ("AWS_ACCESS_KEY_ID", "ENV"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]);
        let r = resolve(&e, None).unwrap();
        assert!(matches!(&r.source, Source::Keys(k, _) if k.access_key_id == "ENV"));
        assert_eq!(r.region, "eu-west-1");
        assert_eq!(
            resolve(&e, Some("ap-south-1")).unwrap().region,
            "ap-south-1"
        );
        assert!(!format!("{r:?}").contains("secret"), "no secret in Debug");
        assert!(resolve(&env(&[("AWS_ACCESS_KEY_ID", "x")]), None).is_err());
    }

    #[test]
    fn profiles_from_the_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "# comment\n[default]\naws_access_key_id=D\naws_secret_access_key=d\n\n\
             [ci]\naws_access_key_id = CI\naws_secret_access_key = c\naws_session_token = t\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = us-west-2\n[profile ci]\nregion = eu-central-1\ns3 =\n  addressing_style = path\n\
             [profile sso]\nsso_session = corp\n[profile only-config]\naws_access_key_id = OC\naws_secret_access_key = oc\n",
        )
        .unwrap();
        let base = [
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
        ];
        let r = resolve(&env(&base), None).unwrap();
        assert!(matches!(&r.source, Source::Keys(k, _) if k.access_key_id == "D"));
        assert_eq!(r.region, "us-west-2");

        let mut with = base.to_vec();
        with.push(("AWS_PROFILE", "ci"));
        let r = resolve(&env(&with), None).unwrap();
        match &r.source {
            Source::Keys(k, from) => {
                assert_eq!(k.access_key_id, "CI");
                assert_eq!(k.session_token.as_deref(), Some("t"));
                assert!(from.contains("profile ci"), "{from}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.region, "eu-central-1");

        with.pop();
        with.push(("AWS_PROFILE", "only-config"));
        let r = resolve(&env(&with), None).unwrap();
        assert!(matches!(&r.source, Source::Keys(k, _) if k.access_key_id == "OC"));

        with.pop();
        with.push(("AWS_PROFILE", "sso"));
        let e = resolve(&env(&with), None).unwrap_err();
        assert!(
            e.contains("sso_session") && e.contains("export-credentials"),
            "{e}"
        );

        with.pop();
        with.push(("AWS_PROFILE", "nope"));
        let e = resolve(&env(&with), None).unwrap_err();
        assert!(e.contains("no such profile"), "{e}");
    }

    #[test]
    fn roles_last_and_metadata_can_be_disabled() {
        let none = env(&[("HOME", "/nonexistent")]);
        assert_eq!(
            resolve(&none, None).unwrap().source,
            Source::Role("the EC2 instance role")
        );
        let off = env(&[
            ("HOME", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]);
        assert!(resolve(&off, None)
            .unwrap_err()
            .contains("no AWS credentials found"));
        let ecs = env(&[
            ("HOME", "/nonexistent"),
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds"),
        ]);
        assert_eq!(
            resolve(&ecs, None).unwrap().source,
            Source::Role("the ECS task role")
        );
    }
}
