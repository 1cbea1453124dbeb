//! Rebuild the eBPF object when the linker changes, and fail early with a
//! useful message when it is missing.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!("bpf-linker not found on PATH; run `cargo xtask setup`"),
    }
}
