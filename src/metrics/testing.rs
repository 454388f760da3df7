//! Test support: a strict reader of the text exposition, shared by the unit
//! tests of every file (they all check what a scrape shows).

/// A sample line: `name{labels} value`.
pub(super) struct Sample {
    pub(super) name: String,
    pub(super) labels: Vec<(String, String)>,
    pub(super) value: f64,
}

/// Checks every line is a comment (`# HELP|TYPE|UNIT|EOF`) or a well-formed
/// sample, and that `# EOF` ends the text. Returns the samples.
pub(super) fn parse_exposition(text: &str) -> Vec<Sample> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "must end with # EOF");
    assert!(text.ends_with("# EOF\n"));
    let mut samples = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let kind = rest.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "bad comment: {line}"
            );
            if kind == "TYPE" {
                let t = rest.rsplit(' ').next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&t),
                    "{line}"
                );
            }
            continue;
        }
        samples.push(parse_sample(line));
    }
    samples
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("no value: {line}"));
    let value: f64 = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let body = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed: {line}"));
            let labels = body
                .split(',')
                .map(|kv| {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("label: {line}"));
                    assert!(valid_name(k), "label name: {line}");
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                    let v = v.unwrap_or_else(|| panic!("label value not quoted: {line}"));
                    assert!(!v.contains('"') && !v.contains('\\'), "{line}");
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            (name, labels)
        }
    };
    assert!(valid_name(name), "metric name: {line}");
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

pub(super) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    find(samples, name, labels).value
}

/// Bucket values of one histogram series, in order, with their `le`.
pub(super) fn buckets(
    samples: &[Sample],
    name: &str,
    extra: Option<(&str, &str)>,
) -> Vec<(String, f64)> {
    samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .filter(|s| {
            extra.map_or(s.labels.len() == 1, |(k, v)| {
                s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v)
            })
        })
        .map(|s| {
            let le = s.labels.iter().find(|(k, _)| k == "le").unwrap().1.clone();
            (le, s.value)
        })
        .collect()
}
