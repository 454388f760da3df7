//! `--hgrm PREFIX`: each latency histogram's percentile distribution in
//! HdrHistogram's standard text form (what `outputPercentileDistribution`
//! prints and HdrHistogram's plotters read), values in milliseconds.
use crate::stats::Latency;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Percentile ticks per halving of the distance to 100 %, as the standard
/// output uses.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The histograms hold nanoseconds; the files give milliseconds.
const NS_PER_MS: f64 = 1e6;

/// The distribution of `h`, formatted as HdrHistogram's
/// `outputPercentileDistribution` would with a 1e6 scaling ratio.
pub fn distribution(h: &Latency) -> String {
    let h = &h.0;
    // Decimals follow the histogram's significant digits, as upstream does.
    let d = usize::from(h.sigfig());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64 / NS_PER_MS;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:>12.d$} {q:>2.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:>12.d$} {q:>2.12} {total:>10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.d$}, StdDeviation   = {:>12.d$}]",
        h.mean() / NS_PER_MS,
        h.stdev() / NS_PER_MS
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.d$}, Total count    = {:>12}]",
        h.max() as f64 / NS_PER_MS,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets(h.sigfig())
    );
    out
}

/// The sub-bucket count HdrHistogram derives from the significant digits
/// (the crate keeps its own private): the power of two at or above
/// 2 × 10^digits.
fn sub_buckets(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// Writes `PREFIX-<name>.hgrm` for every non-empty histogram; returns the
/// paths written.
pub fn write_all(prefix: &Path, hists: &[(&str, &Latency)]) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (name, h) in hists.iter().filter(|(_, h)| !h.is_empty()) {
        let mut file = prefix.as_os_str().to_owned();
        file.push(format!("-{name}.hgrm"));
        let path = PathBuf::from(file);
        std::fs::write(&path, distribution(h))
            .with_context(|| format!("write {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1..=10000 µs, once each.
    fn uniform() -> Latency {
        let mut h = Latency::default();
        for us in 1..=10_000u64 {
            h.record_since(0, us * 1000);
        }
        h
    }

    #[test]
    fn the_standard_text() {
        let text = distribution(&uniform());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        // The first tick is the lowest value at percentile 0.
        assert_eq!(
            lines[2],
            "       0.001 0.000000000000          1           1.00"
        );
        // Ticks of 10 % up to 50 %, then 5 % to 75 %.
        assert!(lines[3].contains(" 0.100000000000 "), "{}", lines[3]);
        assert!(
            lines[7].starts_with("       5.001 0.500000000000 "),
            "{}",
            lines[7]
        );
        assert!(lines[8].contains(" 0.550000000000 "), "{}", lines[8]);
        // Last row: percentile 1, every value counted, no 1/(1-p) column.
        let footer = lines.iter().position(|l| l.starts_with('#')).unwrap();
        let last: Vec<&str> = lines[footer - 1].split_whitespace().collect();
        assert_eq!(last, ["10.002", "1.000000000000", "10000"]);
        assert_eq!(
            lines[footer],
            "#[Mean    =        5.001, StdDeviation   =        2.887]"
        );
        assert_eq!(
            lines[footer + 1],
            "#[Max     =       10.002, Total count    =        10000]"
        );
        assert!(lines[footer + 2].starts_with("#[Buckets = "));
        assert!(lines[footer + 2].ends_with("SubBuckets     =         2048]"));
        assert_eq!(lines.len(), footer + 3);
    }

    /// What a plotter does: every row parses, values and percentiles only
    /// grow, counts end at the total.
    #[test]
    fn parses_back() {
        let mut h = uniform();
        for _ in 0..100 {
            h.record_since(0, 900_000_000);
        }
        let text = distribution(&h);
        let mut prev = (0.0f64, 0.0f64, 0u64);
        let mut rows = 0;
        for line in text.lines().skip(2).take_while(|l| !l.starts_with('#')) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let value: f64 = cols[0].parse().unwrap();
            let p: f64 = cols[1].parse().unwrap();
            let count: u64 = cols[2].parse().unwrap();
            assert!(value >= prev.0 && p >= prev.1 && count >= prev.2, "{line}");
            if p < 1.0 {
                let inv: f64 = cols[3].parse().unwrap();
                assert!((inv - 1.0 / (1.0 - p)).abs() < 0.01, "{line}");
            }
            prev = (value, p, count);
            rows += 1;
        }
        assert!(rows > 30, "{rows} rows");
        assert_eq!(prev.1, 1.0);
        assert_eq!(prev.2, 10_100);
        assert!((prev.0 - 900.0).abs() < 1.0, "{prev:?}");
    }

    #[test]
    fn writes_only_what_has_values() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("run.1");
        let paths = write_all(
            &prefix,
            &[("push", &uniform()), ("ack", &Latency::default())],
        )
        .unwrap();
        assert_eq!(paths, [dir.path().join("run.1-push.hgrm")]);
        let text = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(text.contains("Total count    =        10000]"));
    }
}
