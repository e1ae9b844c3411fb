//! The `palisade` command line: parses arguments, calls the library, prints.

mod cli;

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: with hundreds of proxy connections
/// each holding a few small buffers, glibc's per-thread arenas fragment
/// (about 44 MiB peak at 500 kept-alive clients against about 36 MiB), and
/// its free lists cost more CPU per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commits arena memory as it is used rather than the whole arena up front,
/// and gives freed pages back at once: resident memory then follows what
/// the connections hold. Runs from `.init_array`, before the Rust runtime
/// makes its first allocation (which reserves the first arena).
extern "C" fn set_allocator_options() {
    palisade::sys::lean_allocator();
}

#[used]
#[link_section = ".init_array"]
static SET_ALLOCATOR_OPTIONS: extern "C" fn() = set_allocator_options;

fn main() -> ExitCode {
    cli::run()
}
