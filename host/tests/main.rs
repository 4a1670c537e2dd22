//! The host's integration tests, in one binary so that the suite links once.

mod suite;
