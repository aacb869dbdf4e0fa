//! HDR percentile plots: latency (ms, y) against percentile (x, on a log scale of
//! 1/(1-p), so 90%, 99%, 99.9%, ... are evenly spaced and the tail is visible), one line per
//! series, written as SVG and PNG. Text needs a TrueType font: the first of a few common
//! system paths (Debian: `fonts-dejavu-core`), or `SLUICE_PLOT_FONT=path.ttf`.

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for plot text once; the error says how to get one.
pub fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("SLUICE_PLOT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let (path, bytes) =
            candidates.iter().find_map(|p| std::fs::read(p).ok().map(|b| (p.clone(), b))).ok_or_else(|| {
                "no font for plot text: install fonts-dejavu-core (Debian) or set SLUICE_PLOT_FONT=path.ttf".to_string()
            })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
}

/// Highest "nines" on the x axis: 99.9999%.
const X_MAX: f64 = 1e6;

/// The percentile at x = 1/(1-p) = 10^k: 0%, 90%, 99%, 99.9%, ...
fn nines(x: &f64) -> String {
    match x.log10().round() as usize {
        0 => "0%".into(),
        1 => "90%".into(),
        k => format!("99{}{}%", if k > 2 { "." } else { "" }, "9".repeat(k - 2)),
    }
}

/// (x = 1/(1-p), latency ms) points of a histogram recorded in microseconds.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut x = 1.0f64;
    while x <= X_MAX {
        let q = 1.0 - 1.0 / x;
        out.push((x, h.value_at_quantile(q) as f64 / 1000.0));
        x *= 1.05;
    }
    out.push((X_MAX, h.max() as f64 / 1000.0));
    out
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    series: &[(String, Histogram<u64>)],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    area.fill(&WHITE).map_err(e)?;
    let y_max = series.iter().map(|(_, h)| h.max() as f64 / 1000.0).fold(0.001, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..X_MAX).log_scale(), 0f64..y_max)
        .map_err(e)?;
    chart.configure_mesh().x_desc("percentile").y_desc("latency (ms)").x_label_formatter(&nines).draw().map_err(e)?;
    for (i, (name, h)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points(h), color.stroke_width(2)))
            .map_err(e)?
            .label(format!(
                "{name} (p99 {:.2} ms, max {:.2} ms)",
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    area.present().map_err(e)
}

/// Writes `<base>.svg` and `<base>.png` (an extension on `base` is dropped); returns the paths.
pub fn hdr_plot(base: &Path, title: &str, series: &[(String, Histogram<u64>)]) -> Result<Vec<PathBuf>, String> {
    ensure_font()?;
    let stem = base.with_extension("");
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), title, series)
        .map_err(|err| format!("{}: {err}", svg.display()))?;
    draw(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), title, series)
        .map_err(|err| format!("{}: {err}", png.display()))?;
    Ok(vec![svg, png])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_files() {
        assert_eq!(nines(&1.0), "0%");
        assert_eq!(nines(&10.0), "90%");
        assert_eq!(nines(&100.0), "99%");
        assert_eq!(nines(&1e5), "99.999%");
        let mut h = crate::micros_histogram();
        for v in 1..10_000u64 {
            h.record(v * 3).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("sluice-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = hdr_plot(&dir.join("run.json"), "test run", &[("ack".into(), h)]).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.contains("percentile") && svg.contains("99.9%") && svg.contains("ack (p99"), "{svg}");
        let png = std::fs::read(&files[1]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
