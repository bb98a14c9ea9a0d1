#!/usr/bin/env python3
"""Where the compile time of 100 `effects!` schemas goes: the macros' run against the code they
return, and what each generated piece costs. Counted in instructions, not seconds.

Builds run.py's two crates (generated, hand-written), then variants of the generated crate whose
source is its own macro expansion (`rustc -Zunpretty=expanded`, through RUSTC_BOOTSTRAP=1 since
the flag is unstable) with `effects!`, our derives, or both already expanded, so the compiler
compiles the same code without running those macros; serde's derive stays a derive in every
variant, as in the hand-written crate. Then, on the variant with both expanded, one generated
piece removed at a time (the typed merge, the `maybe_`/`extend_` setters, the moving
conversions, `Serialize`, the doc comments, `#[inline]`).

Each crate is rebuilt as run.py does (its `lib.rs` touched, dependencies built), and the
compiler's work on that rebuild is counted once under `valgrind --tool=callgrind`: instructions
executed by `rustc`, which repeat to a few parts in a million between runs, where CPU time on
this machine moves by a tenth. Ratios are against the hand-written crate.

The expanded source is cut apart by the layout of rustc's pretty-printer for exactly the crate
run.py writes; a change of either may need the patterns here updated (the script stops if a
variant does not compile or a pattern matches nothing).

Usage: python3 tests/compile-time/split.py [--schemas 100]
"""

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import run


def rustc_command(path, target):
    """The `rustc` command cargo runs for the crate's lib, after touching its source; the build
    it runs leaves the incremental cache that the counted rebuild then uses."""
    os.utime(os.path.join(path, "src", "lib.rs"))
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    out = subprocess.run(["cargo", "build", "-v", "--offline", "--lib"], cwd=path, env=env,
                         check=True, capture_output=True, text=True).stderr
    name = os.path.basename(path).replace("-", "_")
    lines = [m.group(1) for m in re.finditer(r"Running `(.*)`", out)
             if f"--crate-name {name} " in m.group(1)]
    if len(lines) != 1:
        raise SystemExit(f"expected one rustc invocation of {name}, cargo printed {len(lines)}")
    return lines[0]


def instructions(path, target):
    """Instructions `rustc` executes on a touch rebuild of the crate (callgrind's `Collected`)."""
    command = rustc_command(path, target)
    os.utime(os.path.join(path, "src", "lib.rs"))
    out = subprocess.run(
        f"valgrind --tool=callgrind --callgrind-out-file=/dev/null {command}",
        shell=True, cwd=path, check=True, capture_output=True, text=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if not m:
        raise SystemExit(f"callgrind printed no count for {path}:\n{out[-2000:]}")
    return int(m.group(1))


def block_end(s, start):
    """Index just past the brace-delimited block that opens at or after `start`."""
    k, depth = s.index("{", start), 0
    while True:
        if s[k] == "{":
            depth += 1
        elif s[k] == "}":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1


def remove_blocks(s, pattern, what):
    out, pos, n = [], 0, 0
    for m in re.finditer(pattern, s):
        if m.start() < pos:
            continue
        out.append(s[pos:m.start()])
        pos = block_end(s, m.end() - 1)
        n += 1
    if n == 0:
        raise SystemExit(f"no {what} found in the expanded source")
    out.append(s[pos:])
    return "".join(out)


def pieces(exp):
    """The expanded schemas (by number) and our derives' blocks (by type name)."""
    schemas = {}
    for m in re.finditer(r'#\[doc = " Effects schema `Schema(\d+)`\."\]', exp):
        end = exp.find("#[datom(entity", m.end())
        schemas[int(m.group(1))] = exp[m.start():end if end >= 0 else len(exp)]
    derives = {}
    for m in re.finditer(
            r"const _: \(\) =\s*\{\s*use ::effects_core::__private::names::\*;\s*"
            r"#\[automatically_derived\]\s*#\[diagnostic::do_not_recommend\]\s*"
            r"impl __(?:Datom|Message) for (\w+) \{", exp):
        end = exp.index(";", block_end(exp, m.start()))
        derives[m.group(1)] = exp[m.start():end + 1]
    return schemas, derives


def expand_schemas(src, schemas):
    return re.sub(r"effects_core::effects! \{\n    pub Schema(\d+) \{.*?\n\}\n",
                  lambda m: schemas[int(m.group(1))] + "\n", src, flags=re.S)


def expand_derives(src, derives):
    src = re.sub(r"#\[(?:datom|message)\([^\]]*\)\]\s*", "", src)
    src = src.replace("#[derive(effects_core::Datom)]\n", "")
    src = src.replace("#[derive(serde::Serialize, effects_core::Message)]",
                      "#[derive(serde::Serialize)]")
    return re.sub(r"pub struct (\w+) \{[^\n]*\}",
                  lambda m: m.group(0) + "\n" + derives[m.group(1)] + "\n", src)


SETTER = r'#\[doc =\s*"[^"]*"\]\s*#\[inline\]\s*pub fn '


def without_merge(s):
    s = remove_blocks(s, r"#\[automatically_derived\]\s*impl<__T> __MergeInto<__T> for Schema\d+ where",
                      "MergeInto impl")
    s = remove_blocks(s, r"#\[automatically_derived\]\s*impl __Absorbs<\w+, __\w+> for Schema\d+ ",
                      "Absorbs impl")
    return remove_blocks(s, r'#\[doc =\s*" Moves every effect[^"]*"\]\s*#\[inline\]\s*#\[must_use\]\s*pub fn merge',
                         "merge method")


def without_maybe_extend(s):
    s = remove_blocks(s, SETTER + r"maybe_\w+", "maybe_ setter")
    return remove_blocks(s, SETTER + r"extend_\w+", "extend_ setter")


def without_moves(s):
    s = remove_blocks(s, r"#\[inline\]\s*fn into_datom\(self\) -> __DatomEffect ", "into_datom")
    s = remove_blocks(s, r"#\[inline\]\s*fn into_message\(self\) -> __MessageEffect ", "into_message")
    s = remove_blocks(s, r"#\[inline\]\s*fn into_effects\(self\) -> __Effects ", "into_effects")
    # `Schema::into_effects` has no default: the by-reference conversion stands in.
    return replace_all(s, "fn to_effects(&self) -> __Effects {",
                     "fn into_effects(self) -> __Effects { __Schema::to_effects(&self) }\n"
                     "fn to_effects(&self) -> __Effects {", "to_effects")


def without_serialize(s):
    return remove_blocks(s, r"#\[automatically_derived\]\s*impl __Serialize for Schema\d+ ",
                         "Serialize impl")


def without_docs(s):
    out, n = re.subn(r'#\[doc\s*=\s*"(?:[^"\\]|\\.)*"\]', "", s)
    if n == 0:
        raise SystemExit("no doc comment found in the expanded source")
    return out


def without_inline(s):
    return replace_all(s, "#[inline]", "", "#[inline]")


def replace_all(s, old, new, what):
    if old not in s:
        raise SystemExit(f"no {what} found in the expanded source")
    return s.replace(old, new)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", type=int, default=100)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed to count instructions")
    with tempfile.TemporaryDirectory() as base:
        target = os.path.join(base, "target")
        generated = run.write_crate(base, "generated", args.schemas, hand=False)
        hand = run.write_crate(base, "hand", args.schemas, hand=True)
        # First: the builds after it rebuild the dependencies once (see run.expanded_source).
        schemas, derives = pieces(run.expanded_source(generated, target))
        if len(schemas) != args.schemas or len(derives) != 3 * args.schemas:
            raise SystemExit(f"found {len(schemas)} schemas and {len(derives)} derived impls "
                             "in the expanded source; the patterns need updating")
        src = open(os.path.join(generated, "src", "lib.rs")).read()
        both = expand_derives(expand_schemas(src, schemas), derives)
        variants = [
            ("hand-written", hand),
            ("generated", generated),
            ("`effects!` expanded", expand_schemas(src, schemas)),
            ("derives expanded", expand_derives(src, derives)),
            ("both expanded (the code alone)", both),
            ("  without typed merge", without_merge(both)),
            ("  without `maybe_`/`extend_` setters", without_maybe_extend(both)),
            ("  without moving conversions", without_moves(both)),
            ("  without `Serialize`", without_serialize(both)),
            ("  without doc comments", without_docs(both)),
            ("  without `#[inline]`", without_inline(both)),
        ]
        counts = {}
        for i, (label, crate_or_source) in enumerate(variants):
            path = crate_or_source
            if not os.path.isdir(crate_or_source):  # a variant's source: a crate of its own
                path = run.write_crate(base, f"variant{i}", 0, hand=False)
                with open(os.path.join(path, "src", "lib.rs"), "w") as f:
                    f.write(crate_or_source)
            counts[label] = instructions(path, target)
        base_count = counts["hand-written"]
        print(f"rustc instructions on a touch rebuild, {args.schemas} schemas")
        for label, n in counts.items():
            print(f"  {label:<40} {n / 1e6:8.0f} M  {n / base_count:.2f}x")


if __name__ == "__main__":
    main()
