//! STAND-IN, to be replaced by the real chart module (plotters) that another branch adds with
//! this same API. It only lets `ipo csr` compile and run here: `line_chart` checks its input and
//! writes a blank PNG, drawing nothing.

use std::path::{Path, PathBuf};

/// One named line.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub(crate) struct ChartError {
    path: PathBuf,
    msg: String,
}

/// Stand-in: a blank 8x8 PNG at `path`.
pub(crate) fn line_chart(path: &Path, _title: &str, _x_label: &str, _y_label: &str, _series: &[Series], y_range: Option<(f64, f64)>) -> Result<(), ChartError> {
    let err = |msg: String| ChartError { path: path.to_path_buf(), msg };
    if let Some((lo, hi)) = y_range {
        if !(lo < hi) {
            return Err(err(format!("empty y range {lo}..{hi}")));
        }
    }
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 8, 8);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
    w.write_image_data(&[255u8; 8 * 8 * 3]).map_err(|e| err(e.to_string()))
}
