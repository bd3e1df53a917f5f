//! The end-of-training chart metrics.png, written beside metrics.jsonl: one plot per
//! quantity over optimizer steps (loss; implicit rewards chosen / rejected / margin; reward
//! accuracy; and learning rate and gradient norm when logged), drawn by `crate::chart`.

use std::path::Path;

use serde::Deserialize;

use super::TrainError;
use crate::chart::{panels, Panel, Series};

/// The fields of a metrics.jsonl line that the chart plots. Every value is optional, so a
/// line from an older run (or a null written for a non-finite value) still reads.
#[derive(Deserialize)]
struct Row {
    step: f64,
    loss: Option<f64>,
    reward_chosen: Option<f64>,
    reward_rejected: Option<f64>,
    reward_margin: Option<f64>,
    reward_accuracy: Option<f64>,
    lr: Option<f64>,
    grad_norm: Option<f64>,
}

/// Writes the chart of the metrics.jsonl at `metrics` to `png`.
pub(crate) fn write_metrics_chart(metrics: &Path, png: &Path) -> Result<(), TrainError> {
    let rows: Vec<Row> = crate::io::jsonl::read(metrics)?;
    let series = |name: &str, f: fn(&Row) -> Option<f64>| Series {
        name: name.to_string(),
        points: rows.iter().filter_map(|r| f(r).map(|v| (r.step, v))).collect(),
    };
    let panel = |title: &str, y_label: &str, series: Vec<Series>, y_range| Panel { title: title.into(), y_label: y_label.into(), series, y_range };
    let mut plots = vec![
        panel("Loss", "loss (nats)", vec![series("loss", |r| r.loss)], None),
        panel(
            "Implicit rewards",
            "beta x log-ratio (nats)",
            vec![series("chosen", |r| r.reward_chosen), series("rejected", |r| r.reward_rejected), series("margin", |r| r.reward_margin)],
            None,
        ),
        panel("Reward accuracy", "fraction of pairs", vec![series("accuracy", |r| r.reward_accuracy)], Some((-0.02, 1.02))),
    ];
    let lr = series("learning rate", |r| r.lr);
    if !lr.points.is_empty() {
        plots.push(panel("Learning rate", "learning rate", vec![lr], None));
    }
    let norm = series("grad norm", |r| r.grad_norm);
    if !norm.points.is_empty() {
        plots.push(panel("Gradient norm", "L2 norm before clipping", vec![norm], None));
    }
    let title = format!("Training metrics ({} steps)", rows.len());
    panels(png, &title, "optimizer step", &plots).map_err(|e| TrainError::Io(e.to_string()))
}
