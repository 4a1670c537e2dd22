//! Training: optimizers, learning-rate schedules, and the loop that turns a configuration and
//! a prepared dataset into a trained model.

pub mod optimizer;
pub mod schedule;
