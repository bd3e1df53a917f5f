//! The end-of-training chart: loss, reward margin and reward accuracy over steps, three stacked
//! panels in one PNG written beside metrics.jsonl. Drawn into an RGB buffer by hand (lines,
//! axes, a 3x5 pixel font for titles and axis values) and encoded with the `png` crate, so no
//! font files or plotting stack are needed.

use std::path::Path;

use super::{StepMetrics, TrainError};

const W: usize = 900;
const PANEL_H: usize = 220;
const H: usize = 3 * PANEL_H + 30;
const LEFT: usize = 90;
const RIGHT: usize = 20;
const TOP: usize = 28;
const BOTTOM: usize = 22;

struct Canvas {
    px: Vec<u8>, // [H, W, 3] RGB
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = 3 * (y as usize * W + x as usize);
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
                self.set(x + 1, y, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    /// Text in the 3x5 font at scale 2; unknown characters are left blank.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + 8 * k as i64 + 2 * col + ox, y + 2 * row as i64 + oy, c);
                        }
                    }
                }
            }
        }
    }
}

/// 3x5 glyphs, one row per entry, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'A' => [2, 5, 7, 5, 5],
        'C' => [7, 4, 4, 4, 7],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'G' => [7, 4, 5, 5, 7],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'W' => [5, 5, 7, 7, 5],
        'Y' => [5, 5, 2, 2, 2],
        _ => [0; 5],
    }
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// The chart of a metrics.jsonl (`StepMetrics` lines): loss, reward margin and reward
/// accuracy over steps, written to `png`.
pub(crate) fn write_metrics_chart(metrics: &Path, png: &Path) -> Result<(), TrainError> {
    let rows: Vec<StepMetrics> = crate::io::jsonl::read(metrics)?;
    let s = |f: fn(&StepMetrics) -> f64| rows.iter().map(|m| (m.step as f64, f(m))).collect::<Vec<_>>();
    write_chart(png, &[("loss", s(|m| m.loss)), ("reward margin", s(|m| m.reward_margin)), ("reward accuracy", s(|m| m.reward_accuracy))])
}

/// Writes the chart of `series` = (title, [(step, value)]) as a PNG at `path`.
pub(crate) fn write_chart(path: &Path, series: &[(&str, Vec<(f64, f64)>)]) -> Result<(), TrainError> {
    let mut cv = Canvas { px: vec![255; W * H * 3] };
    let colors = [[200, 40, 40], [30, 90, 200], [20, 150, 60]];
    let (x_min, x_max) = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (x_min, x_max) = if x_min.is_finite() { (x_min, x_max.max(x_min + 1.0)) } else { (0.0, 1.0) };
    for (p, (title, pts)) in series.iter().take(3).enumerate() {
        let y0 = p * PANEL_H;
        let (top, bottom) = ((y0 + TOP) as i64, (y0 + PANEL_H - BOTTOM) as i64);
        let (left, right) = (LEFT as i64, (W - RIGHT) as i64);
        let finite: Vec<_> = pts.iter().filter(|q| q.1.is_finite()).collect();
        let (mut lo, mut hi) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| (a.min(q.1), b.max(q.1)));
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let pad = 0.05 * (hi - lo);
        let (lo, hi) = (lo - pad, hi + pad);
        let grid = [225, 225, 225];
        for k in 0..=4 {
            let y = bottom - (bottom - top) * k / 4;
            cv.line((left, y), (right, y), grid, false);
            cv.text(4, y - 5, &fmt(lo + (hi - lo) * k as f64 / 4.0), [60, 60, 60]);
        }
        cv.line((left, top), (left, bottom), [0, 0, 0], false);
        cv.line((left, bottom), (right, bottom), [0, 0, 0], false);
        cv.text(left + 4, (y0 + 6) as i64, title, colors[p % 3]);
        let to_px = |(x, y): (f64, f64)| {
            let px = left + ((x - x_min) / (x_max - x_min) * (right - left) as f64).round() as i64;
            let py = bottom - ((y - lo) / (hi - lo) * (bottom - top) as f64).round() as i64;
            (px, py)
        };
        for w in finite.windows(2) {
            cv.line(to_px(*w[0]), to_px(*w[1]), colors[p % 3], true);
        }
        if finite.len() == 1 {
            let (x, y) = to_px(*finite[0]);
            for d in -2..=2 {
                cv.line((x - 2, y + d), (x + 2, y + d), colors[p % 3], false);
            }
        }
    }
    let yb = (3 * PANEL_H + 8) as i64;
    cv.text(LEFT as i64, yb, &format!("STEP {}", fmt(x_min)), [0, 0, 0]);
    let last = fmt(x_max);
    cv.text((W - RIGHT) as i64 - 8 * last.len() as i64, yb, &last, [0, 0, 0]);

    let file = std::fs::File::create(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let err = |e: png::EncodingError| TrainError::Io(format!("{}: {e}", path.display()));
    let mut w = enc.write_header().map_err(err)?;
    w.write_image_data(&cv.px).map_err(err)?;
    w.finish().map_err(err)
}
