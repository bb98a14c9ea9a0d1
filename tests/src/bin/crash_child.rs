//! The child process of the crash tests (written next).

fn main() {}
