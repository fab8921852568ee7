//! `spur-proxy`: the data plane binary (same as `spur proxy`).

/// glibc's allocator with a cache of freed blocks on each proxy worker (see
/// `spur_proxy::alloc`).
#[global_allocator]
static ALLOC: spur_proxy::alloc::ThreadCache = spur_proxy::alloc::ThreadCache;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    spur_proxy::cli::main(&args)
}
