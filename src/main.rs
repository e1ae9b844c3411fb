//! The `palisade` command line: parses arguments, calls the library, prints.

mod cli;

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: with hundreds of proxy connections
/// each holding a few small buffers, glibc's per-thread arenas fragment
/// (about 44 MiB peak at 500 kept-alive clients against about 36 MiB), and
/// its free lists cost more CPU per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter; `option` is its `mi_option_t` (v3).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_arena_eager_commit` in mimalloc v3's `mi_option_e`.
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Commits arena memory as it is used rather than the whole arena up front,
/// and gives freed pages back at once: resident memory then follows what
/// the connections hold. Runs from `.init_array`, before the Rust runtime
/// makes its first allocation (which reserves the first arena).
extern "C" fn set_allocator_options() {
    // SAFETY: plain setters of mimalloc's process-wide options, called
    // while the process has one thread.
    unsafe {
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

#[used]
#[link_section = ".init_array"]
static SET_ALLOCATOR_OPTIONS: extern "C" fn() = set_allocator_options;

fn main() -> ExitCode {
    cli::run()
}
