//! Compile errors are part of the product: each case under `tests/ui` has a reviewed `.stderr`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/schema/*.rs");
    t.compile_fail("tests/ui/derive/*.rs");
    t.compile_fail("tests/ui/handler/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
