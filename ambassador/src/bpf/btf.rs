//! Byte offsets of kernel struct members, from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). aya parses BTF too, but keeps member
//! offsets to itself; this reads only what it needs: the type section's
//! structs and unions, their members, and anonymous members followed down.

use std::collections::HashMap;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Kinds that only qualify another type (typedef, volatile, const,
/// restrict, type tag): followed to the type they name.
const QUALIFIERS: [u32; 5] = [8, 9, 10, 11, 18];

struct Type {
    kind: u32,
    name: String,
    /// The type a qualifier names.
    refers: u32,
    /// (name, type, bit offset) of a struct's or union's members.
    members: Vec<(String, u32, u32)>,
}

/// `offsetof(sname, member)` in bytes, if the kernel's BTF has it.
pub fn offset_of(sname: &str, member: &str) -> Option<u32> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let types = parse(&data)?;
    let by_name: HashMap<&str, usize> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| t.kind == KIND_STRUCT && !t.members.is_empty())
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    find(&types, *by_name.get(sname)?, member, 0).map(|bits| bits / 8)
}

fn find(types: &[Type], id: usize, member: &str, base: u32) -> Option<u32> {
    for (name, ty, off) in &types[id].members {
        if name == member {
            return Some(base + off);
        }
        if name.is_empty() {
            let mut t = *ty as usize;
            while QUALIFIERS.contains(&types.get(t)?.kind) {
                t = types[t].refers as usize;
            }
            if matches!(types[t].kind, KIND_STRUCT | KIND_UNION)
                && let Some(o) = find(types, t, member, base + off)
            {
                return Some(o);
            }
        }
    }
    None
}

fn parse(d: &[u8]) -> Option<Vec<Type>> {
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    if d.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let hlen = u32_at(d, 4)? as usize;
    let (toff, tlen) = (u32_at(d, 8)? as usize, u32_at(d, 12)? as usize);
    let (soff, slen) = (u32_at(d, 16)? as usize, u32_at(d, 20)? as usize);
    let types = d.get(hlen + toff..hlen + toff + tlen)?;
    let strs = d.get(hlen + soff..hlen + soff + slen)?;
    let name = |o: u32| -> String {
        let s = strs.get(o as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(0);
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    // Type ids start at 1: slot 0 is `void`.
    let mut out = vec![Type {
        kind: 0,
        name: String::new(),
        refers: 0,
        members: vec![],
    }];
    let mut p = 0;
    while p < types.len() {
        let (no, info, sz) = (
            u32_at(types, p)?,
            u32_at(types, p + 4)?,
            u32_at(types, p + 8)?,
        );
        let (kind, vlen, bitfield) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        let mut members = vec![];
        if matches!(kind, KIND_STRUCT | KIND_UNION) {
            for i in 0..vlen {
                let m = p + 12 + 12 * i;
                let off = u32_at(types, m + 8)?;
                let off = if bitfield == 1 { off & 0xff_ffff } else { off };
                members.push((name(u32_at(types, m)?), u32_at(types, m + 4)?, off));
            }
        }
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            2 | 7..=12 | 16 | 18 => 0,
            _ => return None,
        };
        out.push(Type {
            kind,
            name: name(no),
            refers: sz,
            members,
        });
        p += 12 + extra;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_what_the_program_already_assumes() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("skipped: no kernel BTF");
            return;
        }
        assert_eq!(super::offset_of("sk_buff", "cb"), Some(40));
        assert_eq!(super::offset_of("sk_buff", "sk"), Some(24));
        assert!(super::offset_of("tcp_sock", "copied_seq").is_some());
        assert_eq!(super::offset_of("tcp_sock", "no_such_member"), None);
    }
}
