#!/usr/bin/env python3
"""Compile time of 100 `effects!` schemas against the same crate written by hand.

Generates two crates in a temporary directory, both depending on this workspace's effects-core:

  generated/  100 schemas declared with `effects!`, payload types with `#[derive(Datom)]` and
              `#[derive(Message)]`;
  hand/       the same payload types with hand-written `Datom`/`Message` impls and, per schema, a
              plain struct with a hand-written `From<_> for Effects` (no typestate builder, no
              shape metadata, no typed merge, no compile-time checks).

Dependencies are built once; then each crate is rebuilt alone (its `lib.rs` touched) several times
and the median wall time is reported, with the ratio generated / hand, next to the median CPU time
(user + system of cargo and rustc), which other load on the machine disturbs much less than wall
time. With `--expanded`, it also prints the lines of the macro-expanded source of each crate, per
schema (`rustc -Zunpretty=expanded`, through RUSTC_BOOTSTRAP=1 since the flag is unstable).

With `--macros-opt`, a third crate is the generated one built with the proc macros optimised
(`[profile.dev.build-override] opt-level = 3` in its own Cargo.toml): a setting users may choose
for their profile, not the default figure.

CPU time moves by about a tenth between runs on a shared machine; split.py, next to this script,
counts the compiler's instructions instead and splits them between the macros' run and the code
they return.

Usage: python3 tests/compile-time/run.py [--schemas 100] [--runs 5] [--profile dev|release] [--expanded]
       [--before CHECKOUT] [--macros-opt]
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def payloads(i, hand):
    out = []
    if hand:
        out.append(f"""
pub struct Row{i} {{ pub id: String, pub amount: i64, pub memo: String }}
impl effects_core::Datom for Row{i} {{
    const ENTITY: &'static str = "row{i}";
    const IDENTITY: &'static str = "row{i}/id";
    const ATTRIBUTES: &'static [&'static str] = &["row{i}/amount", "row{i}/memo"];
    fn to_datom(&self) -> effects_core::DatomEffect {{
        effects_core::DatomEffect::assert(
            effects_core::LookupRef::new(Self::IDENTITY, self.id.clone()),
            [
                ("row{i}/amount", serde_json::json!(self.amount)),
                ("row{i}/memo", serde_json::json!(self.memo)),
            ],
        )
    }}
}}
#[derive(serde::Serialize)]
pub struct Event{i} {{ pub id: String, pub kind: String }}
impl effects_core::Message for Event{i} {{
    const TOPIC: &'static str = "event{i}";
    fn to_message(&self) -> effects_core::MessageEffect {{
        effects_core::MessageEffect::new(Self::TOPIC, serde_json::to_value(self).unwrap())
            .with_key(self.id.clone())
    }}
}}
#[derive(serde::Serialize)]
pub struct Audit{i} {{ pub line: String }}
impl effects_core::Message for Audit{i} {{
    const TOPIC: &'static str = "audit{i}";
    fn to_message(&self) -> effects_core::MessageEffect {{
        effects_core::MessageEffect::new(Self::TOPIC, serde_json::to_value(self).unwrap())
    }}
}}
""")
    else:
        out.append(f"""
#[derive(effects_core::Datom)]
#[datom(entity = "row{i}")]
pub struct Row{i} {{ #[datom(id)] pub id: String, pub amount: i64, pub memo: String }}
#[derive(serde::Serialize, effects_core::Message)]
#[message(topic = "event{i}")]
pub struct Event{i} {{ #[message(key)] pub id: String, pub kind: String }}
#[derive(serde::Serialize, effects_core::Message)]
#[message(topic = "audit{i}")]
pub struct Audit{i} {{ pub line: String }}
""")
    return "".join(out)


def schema(i, hand):
    if hand:
        return f"""
pub struct Schema{i} {{ pub row: Row{i}, pub event: Vec<Event{i}>, pub audit: Option<Audit{i}> }}
impl From<Schema{i}> for effects_core::Effects {{
    fn from(s: Schema{i}) -> Self {{
        use effects_core::{{Datom, Message}};
        effects_core::Effects {{
            datoms: vec![s.row.to_datom()],
            requests: Vec::new(),
            messages: s.event.iter().map(Message::to_message)
                .chain(s.audit.iter().map(Message::to_message)).collect(),
        }}
    }}
}}
"""
    return f"""
effects_core::effects! {{
    pub Schema{i} {{
        datoms: [one Row{i} as row],
        messages: [many Event{i} as event, optional Audit{i} as audit],
    }}
}}
"""


def write_crate(base, name, n, hand, root=ROOT, macros_opt=False):
    path = os.path.join(base, name)
    os.makedirs(os.path.join(path, "src"))
    with open(os.path.join(path, "Cargo.toml"), "w") as f:
        f.write(f"""[package]
name = "{name}"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[dependencies]
effects-core = {{ path = "{root}/effects-core", default-features = false }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"
""")
        if macros_opt:
            # A setting of the user's own profile, not something a library can choose.
            f.write("""
[profile.dev.build-override]
opt-level = 3
""")
    with open(os.path.join(path, "src", "lib.rs"), "w") as f:
        f.write("#![allow(missing_docs)]\n")
        for i in range(n):
            f.write(payloads(i, hand))
            f.write(schema(i, hand))
    shutil.copy(os.path.join(root, "Cargo.lock"), os.path.join(path, "Cargo.lock"))
    return path


def build(path, target, profile):
    args = ["cargo", "build", "--quiet", "--offline", "--lib"]
    if profile == "release":
        args.append("--release")
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    subprocess.run(args, cwd=path, env=env, check=True)


def cpu_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def expanded_source(path, target):
    """The crate's macro-expanded source. RUSTC_BOOTSTRAP is part of cargo's fingerprint, so the
    next ordinary build rebuilds the dependencies."""
    env = dict(os.environ, CARGO_TARGET_DIR=target, RUSTC_BOOTSTRAP="1")
    return subprocess.run(
        ["cargo", "rustc", "--quiet", "--offline", "--lib", "--", "-Zunpretty=expanded"],
        cwd=path, env=env, check=True, capture_output=True, text=True,
    ).stdout


def expanded_lines(path, target):
    """Non-blank lines of the crate's macro-expanded source."""
    return sum(1 for line in expanded_source(path, target).splitlines() if line.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", default="dev", choices=["dev", "release"])
    ap.add_argument("--expanded", action="store_true", help="also count expanded lines per schema")
    ap.add_argument("--macros-opt", action="store_true",
                    help="also build the generated crate with `[profile.dev.build-override] opt-level = 3` "
                         "(proc macros compiled optimised: a setting of the user's profile)")
    ap.add_argument("--before", metavar="CHECKOUT",
                    help="also build the generated crate against another checkout's effects-core "
                         "(an earlier version), interleaved with the others in the same run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as base:
        target = os.path.join(base, "target")
        crates = {
            "generated": write_crate(base, "generated", args.schemas, hand=False),
            "hand": write_crate(base, "hand", args.schemas, hand=True),
        }
        if args.macros_opt:
            crates["macros-opt"] = write_crate(
                base, "macros-opt", args.schemas, hand=False, macros_opt=True)
        if args.before:
            crates["before"] = write_crate(
                base, "before", args.schemas, hand=False, root=os.path.abspath(args.before))
        for path in crates.values():
            build(path, target, args.profile)  # dependencies, once
        times = {name: [] for name in crates}
        cpu = {name: [] for name in crates}
        for _ in range(args.runs):
            for name, path in crates.items():  # interleaved, so load hits both alike
                os.utime(os.path.join(path, "src", "lib.rs"))
                start, start_cpu = time.perf_counter(), cpu_of_children()
                build(path, target, args.profile)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_of_children() - start_cpu)
        med = {name: statistics.median(t) for name, t in times.items()}
        med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
        lines = sum(1 for _ in open(os.path.join(crates["hand"], "src", "lib.rs")))
        print(f"compile time, {args.schemas} schemas, {args.profile} profile, median of {args.runs} runs")
        print(f"  generated (effects!)  {med['generated']:.2f}s wall  {med_cpu['generated']:.2f}s cpu")
        print(f"  hand-written          {med['hand']:.2f}s wall  {med_cpu['hand']:.2f}s cpu  ({lines} lines)")
        print(f"  ratio generated/hand  {med['generated'] / med['hand']:.2f} wall  {med_cpu['generated'] / med_cpu['hand']:.2f} cpu")
        if args.before:
            print(f"  before ({args.before})  {med['before']:.2f}s wall  {med_cpu['before']:.2f}s cpu")
            print(f"  ratio before/hand     {med['before'] / med['hand']:.2f} wall  {med_cpu['before'] / med_cpu['hand']:.2f} cpu")
        if args.macros_opt:
            print(f"  generated, proc macros optimised  {med['macros-opt']:.2f}s wall  {med_cpu['macros-opt']:.2f}s cpu")
            print(f"  ratio optimised macros/hand  {med['macros-opt'] / med['hand']:.2f} wall  {med_cpu['macros-opt'] / med_cpu['hand']:.2f} cpu")
        if args.expanded:
            for name, path in crates.items():
                n = expanded_lines(path, target)
                print(f"  expanded {name:<10} {n} lines, {n / args.schemas:.0f} per schema")


if __name__ == "__main__":
    main()
