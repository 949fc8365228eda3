//! A jsonb datum as a `Tree`, read straight from its binary form: the
//! container format of `utils/jsonb.h`, which is the on-disk format and the
//! same in every PostgreSQL version since 9.4. Nothing is converted to
//! text: numbers are written from their stored base-10000 digits.
//!
//! A container is a header (element count and kind) and one JEntry per
//! child (for an object: the keys, then the values), then the children's
//! data. A JEntry holds the child's type and either its length or, every
//! `JB_OFFSET_STRIDE` children, its end offset; numerics and nested
//! containers start at the next 4-byte boundary.
use super::{Member, Node, Tree};
use pgrx::pg_sys;
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

/// A numeric inside the datum.
#[derive(Clone, Copy)]
pub struct Numeric(*const u8);

type JsonbNode<'a> = Node<'a, Container, Numeric>;

/// A detoasted jsonb datum.
pub struct JsonbTree<'a> {
    root: Container,
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
            _datum: PhantomData,
        }
    }
}

fn header(c: Container) -> u32 {
    // SAFETY: every Container points at a container header inside the
    // datum (the root, or one found through a JEntry); headers and JEntries
    // are 4-byte aligned within the datum, which is itself aligned
    // (palloc'd or detoasted).
    unsafe { (c.0 as *const u32).read() }
}

fn container<'a>(c: Container) -> JsonbNode<'a> {
    let h = header(c);
    if h & JB_FOBJECT != 0 {
        Node::Object(c)
    } else if h & JB_FARRAY != 0 {
        Node::Array(c)
    } else {
        pgrx::error!("jsonb holds a container of unknown kind {h:#x}")
    }
}

/// The children of a container, read in storage order: each child's data
/// starts where the previous one's ends, so no offset is searched for.
pub struct Children<'a> {
    jentries: *const u32,
    data: *const u8,
    next: usize,
    count: usize,
    offset: usize,
    _datum: PhantomData<&'a [u8]>,
}

impl<'a> Children<'a> {
    /// All children of `c`: for an object, its keys, then its values.
    fn of(c: Container) -> Self {
        let h = header(c);
        let n = (h & JB_CMASK) as usize;
        let count = if h & JB_FOBJECT != 0 { 2 * n } else { n };
        // SAFETY: the JEntries follow the 4-byte header, and the children's
        // data follows the JEntries, all inside the datum.
        let (jentries, data) = unsafe {
            let jentries = (c.0 as *const u32).add(1);
            (jentries, jentries.add(count) as *const u8)
        };
        Children {
            jentries,
            data,
            next: 0,
            count,
            offset: 0,
            _datum: PhantomData,
        }
    }
}

impl<'a> Iterator for Children<'a> {
    type Item = JsonbNode<'a>;

    #[inline]
    fn next(&mut self) -> Option<JsonbNode<'a>> {
        if self.next == self.count {
            return None;
        }
        // SAFETY: next < count, the number of JEntries. A JEntry holds its
        // child's end offset (JENTRY_HAS_OFF) or its length; the child's
        // bytes are [offset, end) of the data area, and numerics and
        // containers start at the next 4-byte boundary (INTALIGN), as jsonb
        // writes them.
        unsafe {
            let e = self.jentries.add(self.next).read();
            let value = (e & JENTRY_OFFLENMASK) as usize;
            let start = self.offset;
            let end = if e & JENTRY_HAS_OFF != 0 {
                value
            } else {
                start + value
            };
            self.next += 1;
            self.offset = end;
            let aligned = self.data.add((start + 3) & !3);
            Some(match e & JENTRY_TYPEMASK {
                JENTRY_ISSTRING => Node::String(std::slice::from_raw_parts(
                    self.data.add(start),
                    end - start,
                )),
                JENTRY_ISNUMERIC => Node::Number(Numeric(aligned)),
                JENTRY_ISBOOL_FALSE => Node::Bool(false),
                JENTRY_ISBOOL_TRUE => Node::Bool(true),
                JENTRY_ISNULL => Node::Null,
                JENTRY_ISCONTAINER => container(Container(aligned)),
                other => pgrx::error!("jsonb holds an entry of unknown type {other:#x}"),
            })
        }
    }
}

/// Appends the plain decimal text of a numeric (`-123.4500`, `0.00012`,
/// `1000000`) to `out`, read from its stored form: a header with the sign
/// and the weight (the power of 10000 of the first digit), then base-10000
/// digits (`utils/adt/numeric.c`; the on-disk format, the same in every
/// version). False, appending nothing, for NaN and infinities, which jsonb
/// never holds.
///
/// # Safety
/// `numeric` points at a numeric varlena.
unsafe fn numeric_decimal(numeric: *const u8, out: &mut Vec<u8>) -> bool {
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
            return false;
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
                    return false;
                }
                (header & 0x4000 != 0, (u16_at(2) as i16) as i32, 4)
            }
            // NUMERIC_SPECIAL (NaN, infinities).
            _ => return false,
        };
        let ndigits = (len - first) / 2;
        let digit = |i: usize| u16_at(first + 2 * i);
        out.reserve(8 + 4 * ndigits + 4 * weight.unsigned_abs() as usize);
        if ndigits == 0 {
            out.push(b'0');
            return true;
        }
        if negative {
            out.push(b'-');
        }
        // The digit groups before the point: weight + 1 of them.
        let int_groups = weight + 1;
        if int_groups <= 0 {
            out.extend_from_slice(b"0.");
            for _ in 0..(-int_groups) {
                out.extend_from_slice(b"0000");
            }
            for i in 0..ndigits {
                push_group(out, digit(i), true);
            }
        } else {
            for g in 0..int_groups as usize {
                let d = if g < ndigits { digit(g) } else { 0 };
                push_group(out, d, g > 0);
            }
            if ndigits > int_groups as usize {
                out.push(b'.');
                for i in int_groups as usize..ndigits {
                    push_group(out, digit(i), true);
                }
            }
        }
        true
    }
}

/// A base-10000 digit as decimal digits, zero-padded to four unless it
/// leads the number.
#[inline]
fn push_group(out: &mut Vec<u8>, d: u16, padded: bool) {
    let digits = [
        b'0' + (d / 1000 % 10) as u8,
        b'0' + (d / 100 % 10) as u8,
        b'0' + (d / 10 % 10) as u8,
        b'0' + (d % 10) as u8,
    ];
    let skip = if padded || d >= 1000 {
        0
    } else if d >= 100 {
        1
    } else if d >= 10 {
        2
    } else {
        3
    };
    out.extend_from_slice(&digits[skip..]);
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
    type Number = Numeric;
    type Items = Children<'a>;

    fn root(&self) -> JsonbNode<'a> {
        if header(self.root) & JB_FSCALAR != 0 {
            // A scalar is stored as a one-element array marked scalar.
            Children::of(self.root)
                .next()
                .unwrap_or_else(|| pgrx::error!("jsonb holds an empty scalar container"))
        } else {
            container(self.root)
        }
    }

    fn items(&self, c: Container) -> Children<'a> {
        Children::of(c)
    }

    fn members(&self, c: Container, out: &mut Vec<Member<'a, Self>>) {
        let n = (header(c) & JB_CMASK) as usize;
        let mut children = Children::of(c);
        out.reserve(n);
        for _ in 0..n {
            match children.next() {
                Some(Node::String(name)) => out.push((name, Node::Null)),
                _ => pgrx::error!("jsonb holds an object key that is not a string"),
            }
        }
        for (member, value) in out.iter_mut().zip(children) {
            member.1 = value;
        }
    }

    fn number(&self, n: Numeric, out: &mut Vec<u8>) {
        // SAFETY: a Numeric points at a numeric varlena inside the datum.
        unsafe {
            if !numeric_decimal(n.0, out) {
                out.extend_from_slice(numeric_text(n.0).as_bytes());
            }
        }
    }
}
