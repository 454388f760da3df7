//! The push latency histogram as HdrHistogram's percentile-distribution
//! text (the `.hgrm` that HdrHistogram's `outputPercentileDistribution`
//! prints and its plotter reads), values in milliseconds.
use hdrhistogram::Histogram;
use std::fmt::Write;

/// Percentile ticks per half distance to 100 %, HdrHistogram's usual 5.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

const NS_PER_MS: f64 = 1e6;

/// `hist` holds nanoseconds.
pub(crate) fn percentile_distribution(hist: &Histogram<u64>) -> String {
    let ms = |ns: f64| ns / NS_PER_MS;
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    // The iterator gives the count since its previous step; the file wants
    // the running total.
    let mut total = 0u64;
    for step in hist.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += step.count_since_last_iteration();
        let value = ms(step.value_iterated_to() as f64);
        let q = step.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        ms(hist.mean()),
        ms(hist.stdev())
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        ms(hist.max() as f64),
        hist.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        hist.buckets(),
        sub_buckets(hist.sigfig())
    );
    out
}

/// The histogram's sub-buckets per bucket: the power of two that resolves
/// `sigfig` decimal digits (the crate keeps the figure private).
fn sub_buckets(sigfig: u8) -> u64 {
    let single_unit_range = 2 * 10u64.pow(u32::from(sigfig));
    single_unit_range.next_power_of_two()
}

pub(crate) fn write(path: &std::path::Path, hist: &Histogram<u64>) -> std::io::Result<()> {
    std::fs::write(path, percentile_distribution(hist))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loadgen::stats::Latency;

    #[test]
    fn writes_the_percentile_distribution() {
        let mut lat = Latency::default();
        // 1 µs … 10 ms, evenly.
        for i in 1..=10_000u64 {
            lat.0.record(i * 1_000).unwrap();
        }
        let text = percentile_distribution(&lat.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        let rows: Vec<Vec<&str>> = lines[2..lines.len() - 3]
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["0.001", "0.000000000000", "1", "1.00"]);
        // Five ticks per half distance: 0, 0.1 … 0.5, then 0.55 … 0.75, …
        let quantiles: Vec<f64> = rows.iter().map(|r| r[1].parse().unwrap()).collect();
        let want = [
            0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.775,
        ];
        for (got, want) in quantiles.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{quantiles:?}");
        }
        assert!(quantiles.windows(2).all(|w| w[0] < w[1]));
        assert!(rows[..rows.len() - 1].iter().all(|r| r.len() == 4));
        let last = rows.last().unwrap();
        assert_eq!(last, &["10.002", "1.000000000000", "10000"]);
        let counts: Vec<u64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        let footer = &lines[lines.len() - 3..];
        assert!(
            footer[0].starts_with("#[Mean    =        5.00"),
            "{footer:?}"
        );
        assert!(
            footer[0].contains(", StdDeviation   =        2.88"),
            "{footer:?}"
        );
        assert_eq!(
            footer[1],
            "#[Max     =       10.002, Total count    =        10000]"
        );
        assert_eq!(
            footer[2],
            format!(
                "#[Buckets = {:12}, SubBuckets     =         2048]",
                lat.0.buckets()
            )
        );
    }

    #[test]
    fn empty_histogram_has_header_and_footer() {
        let text = percentile_distribution(&Latency::default().0);
        assert_eq!(text.lines().count(), 5);
        assert!(text.contains("Total count    =            0]"));
    }
}
