//! The whole IPO loop (`ipo run`): stages that chain the other subcommands over one run
//! directory, plus the rule-based refusal check its report uses.

pub(crate) mod refusal;
pub mod run;
