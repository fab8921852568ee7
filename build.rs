include!("proxy/link/build_link.rs");

fn main() {
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    spur_link_args(&dir.join("proxy/link/hot-symbols.txt"));
}
