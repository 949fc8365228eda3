//! A jsonb datum as a `Tree`, read straight from its binary form: the
//! container format of `utils/jsonb.h`, which is the on-disk format and the
//! same in every PostgreSQL version since 9.4. Nothing is converted to text
//! but numbers (by `numeric_out`, exactly as jsonb prints them).
//!
//! A container is a header (element count and kind) and one JEntry per
//! child (for an object: the keys, then the values), then the children's
//! data. A JEntry holds the child's type and either its length or, every
//! `JB_OFFSET_STRIDE` children, its end offset; numerics and nested
//! containers start at the next 4-byte boundary.
use super::{Node, Tree};
use pgrx::pg_sys;
use std::borrow::Cow;
use std::marker::PhantomData;

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;

const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;

/// A container inside the datum.
#[derive(Clone, Copy)]
pub struct Container(*const u8);

/// A detoasted jsonb datum.
pub struct JsonbTree<'a> {
    root: Container,
    /// The last child whose offset was found: (container, index, offset).
    /// Children are mostly read in order, and the next one's offset is
    /// then this one's plus its length.
    last: std::cell::Cell<(usize, usize, usize)>,
    _datum: PhantomData<&'a [u8]>,
}

impl<'a> JsonbTree<'a> {
    /// # Safety
    /// `jsonb` points at a detoasted jsonb value that stays alive and
    /// unchanged for `'a`.
    pub unsafe fn new(jsonb: *const pg_sys::Jsonb) -> Self {
        // SAFETY: a Jsonb is a varlena header followed by the root
        // container (`Jsonb.root`).
        let root = unsafe { (jsonb as *const u8).add(pg_sys::VARHDRSZ) };
        JsonbTree {
            root: Container(root),
            last: std::cell::Cell::new((0, 0, 0)),
            _datum: PhantomData,
        }
    }

    fn header(&self, c: Container) -> u32 {
        // SAFETY: every Container points at a container header inside the
        // datum (the root, or one found through a JEntry); headers and
        // JEntries are 4-byte aligned within the datum, which is itself
        // aligned (palloc'd or detoasted).
        unsafe { (c.0 as *const u32).read() }
    }

    fn jentry(&self, c: Container, i: usize) -> u32 {
        // SAFETY: i < the number of children of c (callers index children
        // of the count in the header), and the JEntries follow the header.
        unsafe { (c.0 as *const u32).add(1 + i).read() }
    }

    fn children(&self, c: Container) -> usize {
        let h = self.header(c);
        let n = (h & JB_CMASK) as usize;
        if h & JB_FOBJECT != 0 {
            2 * n
        } else {
            n
        }
    }

    /// Offset of child `i`'s data from the end of the JEntries.
    fn offset(&self, c: Container, i: usize) -> usize {
        let (lc, li, lo) = self.last.get();
        let offset = if lc == c.0 as usize && i == li + 1 {
            lo + self.length(c, li, lo)
        } else if lc == c.0 as usize && i == li {
            lo
        } else {
            let mut offset = 0usize;
            for j in (0..i).rev() {
                let e = self.jentry(c, j);
                offset += (e & JENTRY_OFFLENMASK) as usize;
                if e & JENTRY_HAS_OFF != 0 {
                    break;
                }
            }
            offset
        };
        self.last.set((c.0 as usize, i, offset));
        offset
    }

    fn length(&self, c: Container, i: usize, offset: usize) -> usize {
        let e = self.jentry(c, i);
        if e & JENTRY_HAS_OFF != 0 {
            (e & JENTRY_OFFLENMASK) as usize - offset
        } else {
            (e & JENTRY_OFFLENMASK) as usize
        }
    }

    fn child(&self, c: Container, i: usize) -> Node<'a, Container> {
        let e = self.jentry(c, i);
        let offset = self.offset(c, i);
        // SAFETY: the data area starts after the header and all JEntries;
        // a child's bytes are [offset, offset + length) in it, and numerics
        // and containers start at the next 4-byte boundary (INTALIGN), as
        // jsonb writes them.
        unsafe {
            let data = c.0.add(4 * (1 + self.children(c)));
            let at = data.add(offset);
            let aligned = data.add((offset + 3) & !3);
            match e & JENTRY_TYPEMASK {
                JENTRY_ISSTRING => {
                    let len = self.length(c, i, offset);
                    Node::String(std::slice::from_raw_parts(at, len))
                }
                JENTRY_ISNUMERIC => Node::Number(match numeric_decimal(aligned) {
                    Some(text) => Cow::Owned(text),
                    None => Cow::Borrowed(numeric_text(aligned)),
                }),
                JENTRY_ISBOOL_FALSE => Node::Bool(false),
                JENTRY_ISBOOL_TRUE => Node::Bool(true),
                JENTRY_ISNULL => Node::Null,
                JENTRY_ISCONTAINER => self.container(Container(aligned)),
                other => pgrx::error!("jsonb holds an entry of unknown type {other:#x}"),
            }
        }
    }

    fn container(&self, c: Container) -> Node<'a, Container> {
        let h = self.header(c);
        if h & JB_FOBJECT != 0 {
            Node::Object(c)
        } else if h & JB_FARRAY != 0 {
            Node::Array(c)
        } else {
            pgrx::error!("jsonb holds a container of unknown kind {h:#x}")
        }
    }
}

/// The plain decimal text of a numeric (`-123.4500`, `0.00012`,
/// `1000000`), read from its stored form: a header with the sign and the
/// weight (the power of 10000 of the first digit), then base-10000 digits
/// (`utils/adt/numeric.c`; the on-disk format, the same in every version).
/// None for NaN and infinities, which jsonb never holds.
///
/// # Safety
/// `numeric` points at a numeric varlena.
unsafe fn numeric_decimal(numeric: *const u8) -> Option<String> {
    // SAFETY: a numeric is a varlena (4-byte header as jsonb stores it, or
    // a 1-byte one, which varsize_any/vardata_any read alike) whose data is
    // a 16-bit header, for the long form a 16-bit weight, then 16-bit
    // digits; all 2-byte aligned within the 4-byte aligned numeric when
    // its header is 4 bytes, so reads are unaligned-safe by read_unaligned.
    unsafe {
        let v = numeric as *const pg_sys::varlena;
        let len = pgrx::varlena::varsize_any_exhdr(v);
        let data = pgrx::varlena::vardata_any(v) as *const u8;
        let u16_at = |off: usize| (data.add(off) as *const u16).read_unaligned();
        if len < 2 {
            return None;
        }
        let header = u16_at(0);
        let (negative, weight, first): (bool, i32, usize) = match header & 0xC000 {
            // NUMERIC_SHORT: sign bit 0x2000, a 7-bit signed weight.
            0x8000 => {
                let w = (header & 0x003F) as i32;
                let w = if header & 0x0040 != 0 { w - 64 } else { w };
                (header & 0x2000 != 0, w, 2)
            }
            // NUMERIC_POS / NUMERIC_NEG: the weight follows.
            0x0000 | 0x4000 => {
                if len < 4 {
                    return None;
                }
                (header & 0x4000 != 0, (u16_at(2) as i16) as i32, 4)
            }
            // NUMERIC_SPECIAL (NaN, infinities).
            _ => return None,
        };
        let ndigits = (len - first) / 2;
        let digit = |i: usize| u16_at(first + 2 * i);
        let mut out = String::with_capacity(8 + 4 * ndigits + 4 * weight.unsigned_abs() as usize);
        if ndigits == 0 {
            out.push('0');
            return Some(out);
        }
        if negative {
            out.push('-');
        }
        // The digit groups before the point: weight + 1 of them.
        let int_groups = weight + 1;
        if int_groups <= 0 {
            out.push_str("0.");
            for _ in 0..(-int_groups) {
                out.push_str("0000");
            }
            for i in 0..ndigits {
                push_group(&mut out, digit(i), true);
            }
        } else {
            for g in 0..int_groups as usize {
                let d = if g < ndigits { digit(g) } else { 0 };
                push_group(&mut out, d, g > 0);
            }
            if ndigits > int_groups as usize {
                out.push('.');
                for i in int_groups as usize..ndigits {
                    push_group(&mut out, digit(i), true);
                }
            }
        }
        Some(out)
    }
}

/// A base-10000 digit as decimal digits, zero-padded to four unless it
/// leads the number.
fn push_group(out: &mut String, d: u16, padded: bool) {
    let digits = [
        b'0' + (d / 1000 % 10) as u8,
        b'0' + (d / 100 % 10) as u8,
        b'0' + (d / 10 % 10) as u8,
        b'0' + (d % 10) as u8,
    ];
    let skip = if padded {
        0
    } else {
        digits.iter().take(3).take_while(|c| **c == b'0').count()
    };
    out.push_str(std::str::from_utf8(&digits[skip..]).expect("ASCII digits"));
}

/// The text of a numeric, as jsonb prints it, in memory of the current
/// memory context (the call's), which outlives the walk.
///
/// # Safety
/// `numeric` points at a numeric varlena.
unsafe fn numeric_text<'a>(numeric: *const u8) -> &'a str {
    // SAFETY: numeric_out takes a numeric datum and returns a palloc'd
    // NUL-terminated ASCII string, left to the memory context.
    unsafe {
        let d = pgrx::direct_function_call_as_datum(
            pg_sys::numeric_out,
            &[Some(pg_sys::Datum::from(numeric))],
        )
        .expect("numeric_out returns text");
        std::ffi::CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>())
            .to_str()
            .expect("numeric text is ASCII")
    }
}

impl<'a> Tree<'a> for JsonbTree<'a> {
    type Container = Container;

    fn root(&self) -> Node<'a, Container> {
        let h = self.header(self.root);
        if h & JB_FSCALAR != 0 {
            // A scalar is stored as a one-element array marked scalar.
            self.child(self.root, 0)
        } else {
            self.container(self.root)
        }
    }

    fn len(&self, c: Container) -> usize {
        (self.header(c) & JB_CMASK) as usize
    }

    fn item(&self, c: Container, i: usize) -> Node<'a, Container> {
        self.child(c, i)
    }

    fn key(&self, c: Container, i: usize) -> &'a [u8] {
        match self.child(c, i) {
            Node::String(s) => s,
            _ => pgrx::error!("jsonb holds an object key that is not a string"),
        }
    }

    fn value(&self, c: Container, i: usize) -> Node<'a, Container> {
        let n = self.len(c);
        self.child(c, n + i)
    }
}
