//! Where inside a function to put its uprobe, so the kernel emulates the
//! probed instruction instead of single-stepping it.
//!
//! A uprobe replaces one instruction with a breakpoint. When it fires, the
//! kernel must then carry out the instruction it replaced: a few kinds it
//! emulates in place (x86-64: `push` of a register, relative `jmp`, `call`
//! and conditional jumps; see `branch_setup_xol_ops` and `push_setup_xol_ops`
//! in the kernel's `arch/x86/kernel/uprobes.c`); any other it copies to a
//! page of the process and single-steps there, which costs a second trap.
//! On the machines we measured, a probe on glibc's `free` at its first
//! instruction (`test %rdi,%rdi`, single-stepped) cost 14 µs per call, and
//! on the `je` right after it (emulated) about 1 µs.
//!
//! So the probe goes on the first instruction the kernel emulates, provided
//! every instruction before it is one whose skipping changes nothing the
//! probe sees or misses:
//! - it falls through to the next instruction (no branch, call or return),
//!   so every path into the function, from its entry or a jump to any of
//!   these instructions, still reaches the probe;
//! - it writes no argument register (`rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`),
//!   nor `rsp` or `rbp`, so the arguments, the stack pointer the programs
//!   pair calls by and the frame chain are what they were at the entry;
//! - it writes no memory, so the return address at `[rsp]` (which a return
//!   probe replaces) is untouched.
//!
//! Flags, `rax`, `r10`, `r11` and reads are fine: `endbr64`, `test`, `cmp`,
//! `mov rax, [rip+x]`. Otherwise, or when no emulated instruction comes
//! within a few instructions, the probe stays at the entry. Not done here:
//! telling which kernel emulates what (the list above has held since
//! Linux 5.x; a newer kernel that emulates more only makes an entry probe
//! cheaper than we think).

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

/// How far from the entry the search goes.
const MAX_SKIPPED: usize = 4;
/// Bytes of the function decoded at most.
const MAX_BYTES: usize = 64;

/// Registers a skipped instruction must not write.
const KEPT: [Register; 8] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
    Register::RSP,
    Register::RBP,
];

/// Where to probe a function whose code starts with `code` (at most its
/// own bytes), as an offset from its entry. 0 when nothing better is safe.
pub fn probe_offset(code: &[u8]) -> u64 {
    let code = &code[..code.len().min(MAX_BYTES)];
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..=MAX_SKIPPED {
        if !decoder.can_decode() {
            return 0;
        }
        let at = decoder.position();
        let insn = decoder.decode();
        if insn.is_invalid() {
            return 0;
        }
        let bytes = &code[at..at + insn.len()];
        if emulated(bytes, insn.flow_control()) {
            return at as u64;
        }
        if !skippable(&insn, &mut info) {
            return 0;
        }
    }
    0
}

/// Whether the kernel emulates the instruction `bytes`: `push r64`
/// (`50+r`, or `41 50+r` for r8-r15) and relative branches (`eb`, `e9`,
/// `e8`, `70-7f`, `0f 80-8f`) without a `66` prefix.
fn emulated(bytes: &[u8], flow: FlowControl) -> bool {
    match bytes {
        [0x50..=0x57] | [0x41, 0x50..=0x57] => return true,
        _ => {}
    }
    let prefixes = bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x64 | 0x65 | 0x36 | 0xf0
            )
        })
        .count();
    if bytes[..prefixes].contains(&0x66) {
        return false;
    }
    let relative = matches!(
        &bytes[prefixes..],
        [0xeb | 0xe9 | 0xe8, ..] | [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..]
    );
    relative
        && matches!(
            flow,
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        )
}

/// Whether skipping the instruction is invisible to the probe (module docs).
fn skippable(insn: &iced_x86::Instruction, info: &mut InstructionInfoFactory) -> bool {
    if insn.flow_control() != FlowControl::Next {
        return false;
    }
    let used = info.info(insn);
    let writes = |a: OpAccess| {
        !matches!(
            a,
            OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
        )
    };
    if used.used_memory().iter().any(|m| writes(m.access())) {
        return false;
    }
    !used
        .used_registers()
        .iter()
        .any(|r| writes(r.access()) && KEPT.contains(&r.register().full_register()))
}

#[cfg(test)]
mod tests {
    use super::probe_offset;

    #[test]
    fn glibc_free_is_probed_at_its_null_check() {
        // test %rdi,%rdi; je +0xbf; push %rbp: the `je` is emulated.
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55];
        assert_eq!(probe_offset(&code), 3);
    }

    #[test]
    fn a_push_at_the_entry_stays_there() {
        // push %r12; push %rbp (glibc's malloc).
        assert_eq!(probe_offset(&[0x41, 0x54, 0x55, 0x53]), 0);
    }

    #[test]
    fn endbr64_and_flag_setting_instructions_are_skipped() {
        // endbr64; cmp $0x0,%rdi; push %rbx
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xff, 0x00, 0x53];
        assert_eq!(probe_offset(&code), 8);
        // mov 0x1234(%rip),%rax; push %rbx: rax is not an argument.
        let code = [0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00, 0x53];
        assert_eq!(probe_offset(&code), 7);
    }

    #[test]
    fn what_changes_arguments_stack_or_memory_keeps_the_entry() {
        // mov %rdi,%rbx would be fine, but mov %rsi,%rdi overwrites arg 0.
        assert_eq!(probe_offset(&[0x48, 0x89, 0xf7, 0x53]), 0);
        // sub $0x18,%rsp moves the stack pointer.
        assert_eq!(probe_offset(&[0x48, 0x83, 0xec, 0x18, 0x53]), 0);
        // mov %rdi,(%rsp) writes memory (the return address).
        assert_eq!(probe_offset(&[0x48, 0x89, 0x3c, 0x24, 0x53]), 0);
        // xor %ebp,%ebp writes rbp (through its low half).
        assert_eq!(probe_offset(&[0x31, 0xed, 0x53]), 0);
        // ret: not a fall-through.
        assert_eq!(probe_offset(&[0xc3, 0x53]), 0);
    }

    #[test]
    fn an_operand_size_prefixed_branch_is_not_emulated() {
        // test %rdi,%rdi; 66-prefixed jmp: the kernel refuses to emulate it.
        assert_eq!(probe_offset(&[0x48, 0x85, 0xff, 0x66, 0xe9, 0x00, 0x00]), 0);
    }

    #[test]
    fn no_emulated_instruction_within_reach_keeps_the_entry() {
        let tests = [0x48, 0x85, 0xff].repeat(6);
        assert_eq!(probe_offset(&tests), 0);
        assert_eq!(probe_offset(&[]), 0);
        assert_eq!(probe_offset(&[0x48, 0x85]), 0);
    }
}
