//! Shared by the tests of `--metrics-addr` (tests/watch_cli.rs,
//! tests/hfs.rs): a scrape of `/metrics`, parsed from the Prometheus text
//! format.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use reqwest::StatusCode;

/// One sample line.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One scrape: the `# TYPE` of each family and every sample.
#[derive(Debug)]
pub struct Scrape {
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// Parses the exposition, checking that every sample belongs to a
    /// family declared by a `# TYPE` line before it.
    pub fn parse(text: &str) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).expect("a sample has a value");
            let name = line[..end].to_string();
            let (labels, rest) = if line[end..].starts_with('{') {
                parse_labels(&line[end + 1..])
            } else {
                (BTreeMap::new(), &line[end..])
            };
            let raw = rest.split_whitespace().next().expect("a value");
            let value = raw
                .parse()
                .unwrap_or_else(|_| panic!("bad value {raw:?} in {line:?}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| {
                    types
                        .get(*f)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                })
                .unwrap_or(&name);
            assert!(
                types.contains_key(family),
                "{name} has no # TYPE line before it"
            );
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Scrape {
            types,
            samples,
            text: text.to_string(),
        }
    }

    /// The sample with exactly these labels, if rendered.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} rendered twice");
        found.first().copied()
    }

    /// The sample with exactly these labels; 0 when not rendered (a
    /// counter that never moved).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name`.
    pub fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    pub fn kind(&self, family: &str) -> &str {
        self.types
            .get(family)
            .unwrap_or_else(|| panic!("no # TYPE {family}:\n{}", self.text))
    }
}

/// `k="v",k2="v2"}` (escapes `\\`, `\"`, `\n`), and what follows the `}`.
fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let (k, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => match chars.next().expect("an escaped character").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i + 1,
                (_, c) => value.push(c),
            }
        };
        labels.insert(k.trim().to_string(), value);
        rest = &after[end..];
    }
}

/// `GET {metrics}/metrics`: 200, plain text, parsed.
pub async fn scrape(http: &reqwest::Client, metrics: &str) -> Scrape {
    scrape_typed(http, metrics).await.0
}

/// [`scrape`], and the response's `Content-Type`.
pub async fn scrape_typed(http: &reqwest::Client, metrics: &str) -> (Scrape, String) {
    let r = http.get(format!("{metrics}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    (Scrape::parse(&r.text().await.unwrap()), ct)
}
