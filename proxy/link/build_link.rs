// Link arguments for Spur's binaries (`spur`, `spur-proxy`), included by the build scripts
// of both packages. They change where the code sits, never what it does:
//
// - `--symbol-ordering-file=proxy/link/hot-symbols.txt`: the functions a proxy runs (start-up,
//   the HTTP/1.1, HTTP/2 and mesh request paths, the admin endpoints) are laid out together.
//   A binary's code is paged in 64 KiB at a time, so scattered hot code made most of the
//   10 MiB of code resident; together it is a fraction of that. `benches/hot-symbols.sh`
//   writes the file; names it lists that a build lacks are skipped (so a stale list costs
//   memory, never correctness: regenerate it after request-path, dependency or toolchain
//   changes, which rename functions).
// - `-z pack-relative-relocs`: relative relocations packed (DT_RELR, glibc 2.36+): the
//   loader reads a few KiB instead of 750 KiB of `.rela.dyn` at every start.
//
// Not every linker takes them (rust-lld, rustc's default on x86_64 Linux since Rust 1.90,
// does; GNU ld packs relocations but has no symbol ordering), and a DT_RELR binary does not
// load on an older glibc. So a probe links and runs an empty program with them first, with the same rustc,
// RUSTFLAGS and linker as the build; whatever the probe refuses is left out. SPUR_PLAIN_LINK=1
// leaves both out. Only for native Linux builds (the probe must run here).

fn spur_link_args(order_file: &std::path::Path) {
    // Cargo itself reruns the script when RUSTFLAGS or the linker change.
    println!("cargo:rerun-if-env-changed=SPUR_PLAIN_LINK");
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    if env("CARGO_CFG_TARGET_OS") != "linux"
        || env("TARGET") != env("HOST")
        || env("SPUR_PLAIN_LINK") == "1"
    {
        return;
    }
    let order = if order_file.is_file() {
        println!("cargo:rerun-if-changed={}", order_file.display());
        vec![
            format!("-Wl,--symbol-ordering-file={}", order_file.display()),
            "-Wl,--no-warn-symbol-ordering".to_string(),
        ]
    } else {
        // Watching a missing file would rebuild the package every time: watch its directory.
        if let Some(dir) = order_file.parent() {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
        println!(
            "cargo:warning={} is missing: the binaries' code is not laid out by use (benches/hot-symbols.sh writes it)",
            order_file.display()
        );
        Vec::new()
    };
    let packed = vec!["-Wl,-z,pack-relative-relocs".to_string()];
    let both = [order.clone(), packed.clone()].concat();
    let chosen = [both, order, packed]
        .into_iter()
        .filter(|args| !args.is_empty())
        .find(|args| probe_links(args));
    for arg in chosen.unwrap_or_default() {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}

/// Whether an empty program links with `link_args` and then runs.
fn probe_links(link_args: &[String]) -> bool {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let Some(out_dir) = std::env::var_os("OUT_DIR").map(std::path::PathBuf::from) else {
        return false;
    };
    let src = out_dir.join("spur_link_probe.rs");
    let bin = out_dir.join("spur_link_probe");
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = match env("RUSTC") {
        r if r.is_empty() => "rustc".to_string(),
        r => r,
    };
    let mut cmd = std::process::Command::new(rustc);
    cmd.arg(&src).arg("-o").arg(&bin);
    cmd.args(
        env("CARGO_ENCODED_RUSTFLAGS")
            .split('\x1f')
            .filter(|f| !f.is_empty()),
    );
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    for arg in link_args {
        cmd.arg(format!("-Clink-arg={arg}"));
    }
    let linked = cmd.output().is_ok_and(|o| o.status.success());
    linked
        && std::process::Command::new(&bin)
            .status()
            .is_ok_and(|s| s.success())
}
