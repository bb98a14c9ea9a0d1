//! Workspace tests: compile errors (trybuild), snapshots (insta), executor and reliability
//! suites. The README's example is compiled and run here as a doctest.
#![doc = include_str!("../../README.md")]

pub mod harness;
