//! Compile errors are part of the product: each case under `tests/ui` has a reviewed `.stderr`,
//! and each compile-fail case gives one error diagnostic as an editor sees it (`one_error`).

mod one_error;

/// The cases do not depend on the service features, so a build with them (CI's
/// `--all-features` run, after the plain `cargo test --workspace` ran them) skips them rather
/// than build trybuild's scratch package a second time with other dependencies; run them there
/// with `-- --ignored`.
#[test]
#[cfg_attr(
    any(feature = "nats", feature = "postgres"),
    ignore = "run by `cargo test --workspace`, without the service features"
)]
fn ui() {
    let trybuild = std::panic::catch_unwind(|| {
        let t = trybuild::TestCases::new();
        t.compile_fail("tests/ui/schema/*.rs");
        t.compile_fail("tests/ui/derive/*.rs");
        t.compile_fail("tests/ui/handler/*.rs");
        t.pass("tests/ui/pass/*.rs");
        // The cases are built when `t` is dropped.
    });
    // Runs after trybuild, whose scratch package and dependencies it reuses; reported even when
    // a `.stderr` differs.
    one_error::check();
    if let Err(panic) = trybuild {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn one_error_counts_duplicates_and_missing_errors() {
    one_error::self_test();
}
