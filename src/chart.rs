//! PNG charts drawn with `plotters` into an RGB buffer, encoded with `png` and written
//! atomically (a temporary file beside the target, then a rename). The text is set in
//! DejaVu Sans, embedded in the binary (assets/fonts/, Bitstream Vera license), so a chart
//! looks the same on a machine without any system fonts: no fontconfig or font-kit.
//!
//! Three kinds: `line_chart` (one line per series over shared axes), `panels` (several such
//! plots in one image, e.g. the training curves) and `bar_chart` (grouped bars with optional
//! confidence intervals). Non-finite values are skipped, empty inputs give empty axes, and a
//! degenerate range (one point, all values equal) is widened, so no input panics.
//! This module is a leaf: it uses nothing else of the crate.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::Ranged;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Why a chart could not be written; every message names the PNG.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChartError {
    /// Arguments that do not describe a chart (series length vs categories, a bad y range).
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// Plotting failed (also: the embedded font could not be loaded).
    #[error("{}: drawing the chart: {msg}", path.display())]
    Draw { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
}

/// One named line.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Series {
    pub name: String,
    /// (x, y); non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One plot of `panels`: its own title, y axis and series (the x axis label is shared).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// None = fitted to the data (with a margin).
    pub y_range: Option<(f64, f64)>,
}

/// One bar: a value and an optional confidence interval [low, high], drawn as an error bar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Bar {
    pub value: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// Pixel size (width, height) of `line_chart` and `bar_chart` images.
pub(crate) const CHART_SIZE: (u32, u32) = (1000, 600);
/// Pixel size of one plot of `panels`; the image adds a title band of `TITLE_H` pixels.
pub(crate) const PANEL_SIZE: (u32, u32) = (700, 340);
const TITLE_H: u32 = 50;

/// Series colours in order (Tableau 10): series k is drawn in `PALETTE[k % 10]`.
pub(crate) const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn color(k: usize) -> RGBColor {
    let (r, g, b) = PALETTE[k % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Registers the embedded font once per process as plotters' "sans-serif".
fn register_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).map_err(|_| "the embedded DejaVu Sans font does not parse".to_string())
    })
    .clone()
}

/// One line per series, shared axes; y_range None = fitted to the data (with a margin).
pub(crate) fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], y_range: Option<(f64, f64)>) -> Result<(), ChartError> {
    check_range(path, y_range)?;
    let (w, h) = CHART_SIZE;
    render(path, (w, h), |root| {
        let panel = Panel { title: title.to_string(), y_label: y_label.to_string(), series: series.to_vec(), y_range };
        draw_panel(root, &panel, x_label, 26)
    })
}

/// Pixel size of a `panels` image of `n` plots: one column up to 2 plots, else two.
pub(crate) fn panels_size(n: usize) -> (u32, u32) {
    let cols = if n >= 3 { 2 } else { 1 };
    let rows = n.div_ceil(cols).max(1) as u32;
    (cols as u32 * PANEL_SIZE.0, TITLE_H + rows * PANEL_SIZE.1)
}

/// Several line plots in one image under a common title, in reading order (two columns from
/// three plots on), each with its own y axis; `x_label` names the x axis of every plot.
pub(crate) fn panels(path: &Path, title: &str, x_label: &str, panels: &[Panel]) -> Result<(), ChartError> {
    for p in panels {
        check_range(path, p.y_range)?;
    }
    let size = panels_size(panels.len());
    render(path, size, |root| {
        let (top, body) = root.split_vertically(TITLE_H);
        let style = TextStyle::from((FAMILY, 28).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
        top.draw(&Text::new(title, (size.0 as i32 / 2, TITLE_H as i32 / 2), &style)).map_err(|e| e.to_string())?;
        let cols = if panels.len() >= 3 { 2 } else { 1 };
        let areas = body.split_evenly((panels.len().div_ceil(cols).max(1), cols));
        for (area, p) in areas.iter().zip(panels) {
            draw_panel(area, p, x_label, 20)?;
        }
        Ok(())
    })
}

/// Grouped bars: one group per category on the x axis, one bar per named series in each group (legend = series names).
pub(crate) fn bar_chart(path: &Path, title: &str, y_label: &str, categories: &[String], series: &[(String, Vec<Bar>)], y_range: Option<(f64, f64)>) -> Result<(), ChartError> {
    check_range(path, y_range)?;
    if let Some((name, bars)) = series.iter().find(|(_, b)| b.len() != categories.len()) {
        return Err(ChartError::Input {
            path: path.to_path_buf(),
            msg: format!("series {name:?} has {} bars for {} categories", bars.len(), categories.len()),
        });
    }
    let (w, h) = CHART_SIZE;
    render(path, (w, h), |root| {
        let n = categories.len().max(1);
        let ys = series.iter().flat_map(|(_, b)| b.iter().flat_map(|b| [Some(b.value), b.low, b.high]).flatten());
        // Bars grow from 0, so the fitted range includes it (as its end when no value passes it).
        let y = y_range.map(|(a, b)| a..b).unwrap_or_else(|| {
            let (lo, hi) = ys.filter(|v| v.is_finite()).fold((0.0_f64, 0.0_f64), |(a, b), v| (a.min(v), b.max(v)));
            let r = fit([lo, hi].into_iter());
            // Headroom above the bars for the legend in the upper right corner.
            let top = if hi == 0.0 && lo < 0.0 { 0.0 } else { r.end + 0.15 * (r.end - r.start) };
            (if lo == 0.0 && hi > 0.0 { 0.0 } else { r.start })..top
        });
        let x = 0.0..n as f64;
        // Roughly how many characters of a category label fit under its group.
        let plot_w = f64::from(w) - 110.0;
        let max_chars = ((plot_w / n as f64) / 8.0).floor().max(3.0) as usize;
        let labels: Vec<String> = categories.iter().map(|c| shorten(c, max_chars)).collect();

        let mut chart = ChartBuilder::on(root)
            .caption(title, (FAMILY, 26))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y.clone())
            .map_err(|e| e.to_string())?;
        let fmt_y = ticks_fmt(&y);
        // The category names go under their groups (drawn below), not at numeric ticks.
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(8)
            .y_label_formatter(&fmt_y)
            .y_desc(y_label)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .max_light_lines(4)
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(|e| e.to_string())?;
        let label_style = TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, l) in labels.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, y.start));
            root.draw(&Text::new(l.as_str(), (px, py + 8), &label_style)).map_err(|e| e.to_string())?;
        }

        let base = 0.0_f64.clamp(y.start, y.end);
        let k = series.len().max(1) as f64;
        let slot = 0.8 / k; // each group spans [i + 0.1, i + 0.9]
        for (s, (name, bars)) in series.iter().enumerate() {
            let c = color(s);
            let x0 = |i: usize| i as f64 + 0.1 + slot * s as f64;
            let rects = bars.iter().enumerate().filter(|(_, b)| b.value.is_finite()).map(|(i, b)| {
                Rectangle::new([(x0(i) + 0.08 * slot, base), (x0(i) + 0.92 * slot, b.value)], c.filled())
            });
            chart
                .draw_series(rects)
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
            // Error bars: a vertical line from low to high with caps, in dark grey.
            let whisker = RGBColor(40, 40, 40).stroke_width(2);
            for (i, b) in bars.iter().enumerate() {
                let (Some(lo), Some(hi)) = (b.low, b.high) else { continue };
                if !(lo.is_finite() && hi.is_finite()) {
                    continue;
                }
                let (xm, cap) = (x0(i) + 0.5 * slot, 0.2 * slot);
                let lines = [
                    vec![(xm, lo), (xm, hi)],
                    vec![(xm - cap, lo), (xm + cap, lo)],
                    vec![(xm - cap, hi), (xm + cap, hi)],
                ];
                chart.draw_series(lines.into_iter().map(|l| PathElement::new(l, whisker))).map_err(|e| e.to_string())?;
            }
        }
        if !series.is_empty() {
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    })
}

/// A y range must be finite and increasing.
fn check_range(path: &Path, r: Option<(f64, f64)>) -> Result<(), ChartError> {
    match r {
        Some((a, b)) if !(a.is_finite() && b.is_finite() && a < b) => {
            Err(ChartError::Input { path: path.to_path_buf(), msg: format!("y range ({a}, {b}) is not a finite increasing interval") })
        }
        _ => Ok(()),
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One line plot (caption, axes with ticks and labels, lines, legend) filling `area`.
fn draw_panel(area: &Area<'_>, p: &Panel, x_label: &str, caption: u32) -> Result<(), String> {
    let finite = |s: &Series| s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect::<Vec<_>>();
    let pts: Vec<Vec<(f64, f64)>> = p.series.iter().map(finite).collect();
    let x = fit_tight(pts.iter().flatten().map(|q| q.0));
    let y = p.y_range.map(|(a, b)| a..b).unwrap_or_else(|| fit(pts.iter().flatten().map(|q| q.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, caption))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x.clone(), y.clone())
        .map_err(|e| e.to_string())?;
    let (fmt_x, fmt_y) = (ticks_fmt(&x), ticks_fmt(&y));
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&fmt_y)
        .x_desc(x_label)
        .y_desc(&p.y_label)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .max_light_lines(4)
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(|e| e.to_string())?;
    for (k, (s, pts)) in p.series.iter().zip(&pts).enumerate() {
        let c = color(k);
        let style = c.stroke_width(2);
        // plotters pins points outside the axes to the border; cut the lines at it instead.
        chart
            .draw_series(clip_y(pts, &y).into_iter().flat_map(|l| LineSeries::new(l, style)))
            .map_err(|e| e.to_string())?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        // Markers where the points are few enough to tell apart (a lone point has no line).
        if pts.len() <= 40 {
            let inside = pts.iter().filter(|q| y.contains(&q.1) || q.1 == y.end);
            chart.draw_series(inside.map(|&q| Circle::new(q, 3, c.filled()))).map_err(|e| e.to_string())?;
        }
    }
    if !p.series.is_empty() {
        legend(&mut chart, emptiest_corner(pts.iter().flatten(), &x, &y))?;
    }
    Ok(())
}

/// The corner of the plot with the fewest points near it, for the legend.
fn emptiest_corner<'p>(pts: impl Iterator<Item = &'p (f64, f64)>, x: &Range<f64>, y: &Range<f64>) -> SeriesLabelPosition {
    let mut n = [0usize; 4]; // upper right, upper left, lower right, lower left
    for &(px, py) in pts {
        let (u, v) = ((px - x.start) / (x.end - x.start), (py - y.start) / (y.end - y.start));
        let (right, left, upper, lower) = (u > 0.6, u < 0.4, v > 0.6, v < 0.4);
        for (k, inside) in [right && upper, left && upper, right && lower, left && lower].into_iter().enumerate() {
            n[k] += usize::from(inside);
        }
    }
    let best = (0..4).min_by_key(|&k| n[k]).unwrap_or(0);
    [SeriesLabelPosition::UpperRight, SeriesLabelPosition::UpperLeft, SeriesLabelPosition::LowerRight, SeriesLabelPosition::LowerLeft][best].clone()
}

fn legend<'a, X: Ranged, Y: Ranged>(chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>, at: SeriesLabelPosition) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|e| e.to_string())
}

/// The polyline `pts` cut to the band `y` (inclusive): the pieces that lie inside it, each
/// segment crossing the band's edge ending at the crossing.
fn clip_y(pts: &[(f64, f64)], y: &Range<f64>) -> Vec<Vec<(f64, f64)>> {
    let (lo, hi) = (y.start, y.end);
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut open = false; // whether the last piece of `out` ends at the current point
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        // Parameters t in [0, 1] of the segment inside the band.
        let (mut t0, mut t1) = (0.0_f64, 1.0_f64);
        if y0 == y1 {
            if y0 < lo || y0 > hi {
                open = false;
                continue;
            }
        } else {
            let (ta, tb) = ((lo - y0) / (y1 - y0), (hi - y0) / (y1 - y0));
            t0 = t0.max(ta.min(tb));
            t1 = t1.min(ta.max(tb));
            if t0 > t1 {
                open = false;
                continue;
            }
        }
        let at = |t: f64| (x0 + t * (x1 - x0), (y0 + t * (y1 - y0)).clamp(lo, hi));
        if !(open && t0 == 0.0) {
            out.push(vec![at(t0)]);
        }
        out.last_mut().expect("a piece was started").push(at(t1));
        open = t1 == 1.0;
    }
    out
}

/// Range of the finite `v` with a 5% margin; a single value or all-equal values get a
/// range around them, no values get 0..1.
fn fit(v: impl Iterator<Item = f64>) -> Range<f64> {
    let r = fit_tight(v);
    let pad = 0.05 * (r.end - r.start);
    (r.start - pad)..(r.end + pad)
}

/// Range of the finite `v` without margin (the x axis: steps from first to last), widened
/// when degenerate.
fn fit_tight(v: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = v.filter(|x| x.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    // Keep the span representable, and widen equal values by a tenth of their size (at
    // least 0.5) each side.
    let (lo, hi) = (lo.max(-f64::MAX / 4.0), hi.min(f64::MAX / 4.0));
    if hi - lo > 1e-9 * lo.abs().max(hi.abs()) {
        return lo..hi;
    }
    let d = (0.1 * lo.abs()).max(0.5);
    (lo - d)..(hi + d)
}

/// Tick label formatter for an axis spanning `r`: enough decimals to tell ticks apart,
/// scientific notation for very large or very small magnitudes.
fn ticks_fmt(r: &Range<f64>) -> impl Fn(&f64) -> String {
    let step = (r.end - r.start) / 8.0;
    let decimals = if step > 0.0 && step.is_finite() { (-step.log10().floor()).clamp(0.0, 6.0) as usize } else { 2 };
    let big = r.start.abs().max(r.end.abs());
    move |v: &f64| {
        let v = if v.abs() < 1e-12 * big { 0.0 } else { *v };
        if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-4 || decimals >= 5) {
            format!("{v:.2e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// `s` cut to at most `max` characters, with an ellipsis when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Draws into a white RGB canvas of `size` and writes it to `path` as a PNG, atomically.
fn render(path: &Path, (w, h): (u32, u32), draw: impl FnOnce(&Area<'_>) -> Result<(), String>) -> Result<(), ChartError> {
    let draw_err = |msg: String| ChartError::Draw { path: path.to_path_buf(), msg };
    register_font().map_err(draw_err)?;
    let mut px = vec![255u8; w as usize * h as usize * 3]; // [h, w, 3] RGB
    {
        let root = BitMapBackend::with_buffer(&mut px, (w, h)).into_drawing_area();
        draw(&root).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| draw_err(e.to_string()))?;
        wr.write_image_data(&px).map_err(|e| draw_err(e.to_string()))?;
        wr.finish().map_err(|e| draw_err(e.to_string()))?;
    }
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `.<name>.tmp-<pid>` beside `path`, syncs, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ChartError> {
    let io = |p: &Path, e: std::io::Error| ChartError::Io { path: p.to_path_buf(), msg: e.to_string() };
    let name = path.file_name().ok_or_else(|| ChartError::Io { path: path.to_path_buf(), msg: "not a file path".into() })?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: seeded test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A decoded RGB image.
    struct Image {
        w: u32,
        h: u32,
        px: Vec<u8>,
    }
    impl Image {
        fn read(path: &Path) -> Image {
            let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
            let mut r = dec.read_info().unwrap();
            let mut px = vec![0; r.output_buffer_size()];
            let info = r.next_frame(&mut px).unwrap();
            assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
            px.truncate(info.buffer_size());
            Image { w: info.width, h: info.height, px }
        }
        fn pixels(&self) -> impl Iterator<Item = (u32, u32, (u8, u8, u8))> + '_ {
            self.px.chunks(3).enumerate().map(|(i, c)| (i as u32 % self.w, i as u32 / self.w, (c[0], c[1], c[2])))
        }
        fn count(&self, c: (u8, u8, u8)) -> usize {
            self.pixels().filter(|p| p.2 == c).count()
        }
        fn distinct(&self) -> usize {
            self.pixels().map(|p| p.2).collect::<std::collections::HashSet<_>>().len()
        }
        /// Dark grey pixels (text, axes) in rows `rows`.
        fn dark_in_rows(&self, rows: Range<u32>) -> usize {
            self.pixels().filter(|(_, y, (r, g, b))| rows.contains(y) && r == g && g == b && *r < 110).count()
        }
    }

    fn walk(rng: &mut Rng, n: usize, scale: f64) -> Vec<(f64, f64)> {
        let mut y = 0.0;
        (1..=n).map(|i| {
            y += scale * (rng.next() - 0.5);
            (i as f64, y)
        })
        .collect()
    }

    fn no_temp_files(dir: &Path) {
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains(".tmp-")).collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn line_chart_draws_every_series_in_its_colour_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.png");
        let mut rng = Rng(7);
        let series: Vec<Series> = (0..3).map(|k| Series { name: format!("run {k}"), points: walk(&mut rng, 200, 1.0 + k as f64) }).collect();
        line_chart(&path, "Random walks", "step", "value (units)", &series, None).unwrap();
        let img = Image::read(&path);
        assert_eq!((img.w, img.h), CHART_SIZE);
        // Antialiased text makes many shades; a blank or flat image has a handful.
        assert!(img.distinct() > 50, "{} distinct colours", img.distinct());
        for (k, &c) in PALETTE.iter().enumerate().take(3) {
            assert!(img.count(c) > 200, "series {k}: {} pixels of {c:?}", img.count(c));
        }
        assert_eq!(img.count(PALETTE[3]), 0, "no fourth series was drawn");
        // The title (top band) and the tick labels are drawn with the embedded font.
        assert!(img.dark_in_rows(0..45) > 100, "title text: {} dark pixels", img.dark_in_rows(0..45));
        no_temp_files(dir.path());
    }

    #[test]
    fn a_fixed_y_range_clips_what_lies_outside() {
        let dir = tempfile::tempdir().unwrap();
        let (inside, outside) = (dir.path().join("in.png"), dir.path().join("out.png"));
        let s = |y: f64| vec![Series { name: "s".into(), points: vec![(0.0, y), (1.0, y)] }];
        line_chart(&inside, "t", "x", "y", &s(0.5), Some((0.0, 1.0))).unwrap();
        line_chart(&outside, "t", "x", "y", &s(5.0), Some((0.0, 1.0))).unwrap();
        // The legend swatch is drawn in both; the line (700+ pixels wide) only when in range.
        let (a, b) = (Image::read(&inside).count(PALETTE[0]), Image::read(&outside).count(PALETTE[0]));
        assert!(a > b + 500, "in range {a} pixels, out of range {b}");
    }

    #[test]
    fn clip_y_cuts_lines_at_the_band() {
        let band = 0.0..1.0;
        // Inside throughout: one piece, unchanged.
        assert_eq!(clip_y(&[(0.0, 0.2), (1.0, 0.8), (2.0, 0.5)], &band), vec![vec![(0.0, 0.2), (1.0, 0.8), (2.0, 0.5)]]);
        // Out through the top and back in: two pieces ending / starting at y = 1.
        assert_eq!(clip_y(&[(0.0, 0.5), (1.0, 1.5), (2.0, 0.5)], &band), vec![vec![(0.0, 0.5), (0.5, 1.0)], vec![(1.5, 1.0), (2.0, 0.5)]]);
        // Entirely outside, or a single point: nothing.
        assert!(clip_y(&[(0.0, 2.0), (1.0, 3.0), (2.0, 2.0)], &band).is_empty());
        assert!(clip_y(&[(0.0, 0.5)], &band).is_empty());
        // Crossing the whole band in one segment.
        assert_eq!(clip_y(&[(0.0, -1.0), (4.0, 3.0)], &band), vec![vec![(1.0, 0.0), (2.0, 1.0)]]);
    }

    #[test]
    fn panels_lay_out_plots_in_a_grid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("panels.png");
        let mut rng = Rng(11);
        let plots: Vec<Panel> = (0..5)
            .map(|p| Panel {
                title: format!("plot {p}"),
                y_label: "y".into(),
                series: (0..=p % 3).map(|k| Series { name: format!("s{k}"), points: walk(&mut rng, 30, 1.0) }).collect(),
                y_range: None,
            })
            .collect();
        panels(&path, "Five plots", "step", &plots).unwrap();
        let img = Image::read(&path);
        assert_eq!((img.w, img.h), panels_size(5));
        assert_eq!(panels_size(5), (2 * PANEL_SIZE.0, TITLE_H + 3 * PANEL_SIZE.1));
        assert_eq!(panels_size(2), (PANEL_SIZE.0, TITLE_H + 2 * PANEL_SIZE.1));
        for (k, &c) in PALETTE.iter().enumerate().take(3) {
            assert!(img.count(c) > 100, "series {k}");
        }
        // Every row of plots has text (captions, ticks) in both columns' left halves.
        for row in 0..3 {
            let y0 = TITLE_H + row * PANEL_SIZE.1;
            assert!(img.dark_in_rows(y0..y0 + PANEL_SIZE.1) > 200, "row {row}");
        }
    }

    #[test]
    fn bar_chart_draws_groups_and_error_bars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.png");
        let mut rng = Rng(3);
        let categories: Vec<String> = ["refusal", "leak", "cue follow", "harmless"].iter().map(|s| s.to_string()).collect();
        let series: Vec<(String, Vec<Bar>)> = ["base", "ipo", "dpo"]
            .iter()
            .map(|name| {
                let bars = (0..4)
                    .map(|_| {
                        let v = rng.next();
                        Bar { value: v, low: Some(v - 0.1 * rng.next()), high: Some(v + 0.1 * rng.next()) }
                    })
                    .collect();
                (name.to_string(), bars)
            })
            .collect();
        bar_chart(&path, "Rates by category", "rate", &categories, &series, Some((0.0, 1.2))).unwrap();
        let img = Image::read(&path);
        assert_eq!((img.w, img.h), CHART_SIZE);
        for (k, &c) in PALETTE.iter().enumerate().take(3) {
            assert!(img.count(c) > 1000, "series {k}: {} pixels", img.count(c));
        }
        assert!(img.count((40, 40, 40)) > 50, "error bars");
        assert!(img.distinct() > 50);
        no_temp_files(dir.path());
    }

    #[test]
    fn edge_cases_give_a_png_or_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let one = |points: Vec<(f64, f64)>| vec![Series { name: "s".into(), points }];
        let lines: Vec<(&str, Vec<Series>)> = vec![
            ("no_series", vec![]),
            ("empty_series", one(vec![])),
            ("single_point", one(vec![(3.0, 2.0)])),
            ("non_finite", one(vec![(0.0, f64::NAN), (1.0, 1.0), (f64::INFINITY, 2.0), (2.0, f64::NEG_INFINITY), (3.0, 0.5)])),
            ("only_non_finite", one(vec![(0.0, f64::NAN), (1.0, f64::INFINITY)])),
            ("all_equal", one(vec![(0.0, 4.0), (1.0, 4.0), (2.0, 4.0)])),
            ("all_zero_same_x", one(vec![(1.0, 0.0), (1.0, 0.0)])),
            ("huge", one(vec![(0.0, -1e300), (1.0, 1e300), (2.0, f64::MAX)])),
            ("tiny", one(vec![(0.0, 1e-30), (1.0, 2e-30)])),
        ];
        for (name, series) in &lines {
            let path = p(&format!("{name}.png"));
            line_chart(&path, name, "x", "y", series, None).unwrap_or_else(|e| panic!("{name}: {e}"));
            let img = Image::read(&path);
            assert_eq!((img.w, img.h), CHART_SIZE, "{name}");
        }
        let long = "a very long category name that would run into its neighbours ".repeat(5);
        let cats: Vec<String> = (0..12).map(|i| format!("{i}: {long}")).collect();
        let bars = |v: f64| cats.iter().map(|_| Bar { value: v, low: Some(f64::NAN), high: None }).collect::<Vec<_>>();
        type Case<'a> = (&'a str, Vec<String>, Vec<(String, Vec<Bar>)>);
        let bar_cases: Vec<Case> = vec![
            ("long_names", cats.clone(), vec![("a".into(), bars(1.0)), ("b".into(), bars(-2.0))]),
            ("nan_bars", cats.clone(), vec![("a".into(), bars(f64::NAN))]),
            ("no_categories", vec![], vec![("a".into(), vec![])]),
            ("no_series", cats.clone(), vec![]),
        ];
        for (name, cats, series) in &bar_cases {
            let path = p(&format!("bar_{name}.png"));
            bar_chart(&path, name, "y", cats, series, None).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((Image::read(&path).w, Image::read(&path).h), CHART_SIZE, "{name}");
        }
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");

        // Errors name the PNG.
        let path = p("mismatch.png");
        let e = bar_chart(&path, "t", "y", &cats, &[("a".into(), vec![])], None).unwrap_err();
        assert!(matches!(e, ChartError::Input { .. }) && e.to_string().contains("mismatch.png") && e.to_string().contains("0 bars for 12"), "{e}");
        for r in [(1.0, 1.0), (2.0, 1.0), (f64::NAN, 1.0), (0.0, f64::INFINITY)] {
            let e = line_chart(&path, "t", "x", "y", &one(vec![(0.0, 0.0)]), Some(r)).unwrap_err();
            assert!(matches!(e, ChartError::Input { .. }) && e.to_string().contains("mismatch.png"), "{e}");
        }
        assert!(!path.exists(), "nothing written on an input error");
        let path = p("missing/sub/chart.png");
        let e = line_chart(&path, "t", "x", "y", &one(vec![(0.0, 0.0)]), None).unwrap_err();
        assert!(matches!(e, ChartError::Io { .. }) && e.to_string().contains("missing/sub/chart.png"), "{e}");
        no_temp_files(dir.path());
    }
}
