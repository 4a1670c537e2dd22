//! Training: optimizers, learning-rate schedules, the plan of a run, single steps,
//! checkpoints, and the loop that turns a configuration and a prepared dataset into a trained
//! model.

pub mod checkpoint;
pub mod hooks;
pub mod optimizer;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod step;
