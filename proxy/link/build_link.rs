// Link arguments for Spur's binaries (`spur`, `spur-proxy`), included by the build scripts
// of both packages. They change where the code sits, never what it does:
//
// - `--symbol-ordering-file=proxy/link/hot-symbols.txt`: the functions a proxy runs (start-up,
//   the HTTP/1.1, HTTP/2 and mesh request paths, the admin endpoints), hottest first, are
//   laid out together. A binary's code is paged in 64 KiB at a time, so scattered hot code
//   made most of the 10 MiB of code resident; together it is a fraction of that.
//   `benches/hot-symbols.sh` writes the file; names it lists that a build lacks are skipped.
// - `-z pack-relative-relocs`: relative relocations packed (DT_RELR, glibc 2.36+): the
//   loader reads a few KiB instead of 750 KiB of `.rela.dyn` at every start.
//
// Both need rust-lld, rustc's default linker for x86_64-unknown-linux-gnu since Rust 1.90;
// they are left out for other targets, older toolchains, a linker chosen in RUSTFLAGS or
// `CARGO_TARGET_<TRIPLE>_LINKER`, or with SPUR_PLAIN_LINK=1 (for a linker chosen in a cargo
// config file, which a build script cannot see).

fn spur_link_args(order_file: &std::path::Path) {
    println!("cargo:rerun-if-changed={}", order_file.display());
    println!("cargo:rerun-if-env-changed=SPUR_PLAIN_LINK");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let target = env("TARGET");
    let own_linker = env("CARGO_ENCODED_RUSTFLAGS").contains("link")
        || !env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty();
    if target != "x86_64-unknown-linux-gnu"
        || target != env("HOST")
        || own_linker
        || env("SPUR_PLAIN_LINK") == "1"
        || !rustc_at_least(&env("RUSTC"), 90)
    {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order_file.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    // A DT_RELR binary needs glibc 2.36 to load: only when the glibc here has it.
    if glibc_at_least(36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// `rustc -V` says "rustc 1.MINOR.PATCH ...", MINOR >= `minor`.
fn rustc_at_least(rustc: &str, minor: u32) -> bool {
    let rustc = if rustc.is_empty() { "rustc" } else { rustc };
    command_version(rustc, &["-V"], "rustc 1.").is_some_and(|m| m >= minor)
}

/// `getconf GNU_LIBC_VERSION` says "glibc 2.MINOR", MINOR >= `minor`.
fn glibc_at_least(minor: u32) -> bool {
    command_version("getconf", &["GNU_LIBC_VERSION"], "glibc 2.").is_some_and(|m| m >= minor)
}

/// The number after `prefix` in the first line a command prints.
fn command_version(cmd: &str, args: &[&str], prefix: &str) -> Option<u32> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let rest = text.trim().strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
