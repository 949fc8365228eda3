//! Numbers in canonical JSON.
//!
//! A number is written as RFC 8785 writes the double nearest to it (the
//! shortest text that reads back as that double, ECMAScript's
//! `Number.prototype.toString`) when that text has exactly the number's
//! value: `0.1`, `19.99`, `4.50` (as `4.5`), `1e30` (as `1e+30`), every
//! integer up to 2^53. Those are the numbers a client's JSON parser turns
//! into doubles and an RFC 8785 library prints back unchanged.
//!
//! Any other number is written as its exact decimal, without exponent,
//! leading zeros, or trailing zeros after the point: `9007199254740993`,
//! `0.1000000000000000055511151231257827`, `1` followed by 400 zeros. Such a
//! text is never what RFC 8785 writes for any double (if it were, it would
//! have that double's value), so two numbers of different value never get
//! the same text, and a request whose account number changed from
//! 9007199254740992 to ...993 changes its fingerprint.

/// A decimal number: value = (-1 if negative) × digits × 10^exp, `digits`
/// without leading or trailing zeros (empty for zero).
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exp: i64,
}

/// Reads JSON number text (`-12.50`, `1E+30`, `0.000`); None if it is not
/// one.
fn parse(text: &str) -> Option<Decimal> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let mut digits = Vec::with_capacity(bytes.len());
    let mut exp: i64 = 0;
    let mut seen_digit = false;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        digits.push(bytes[i]);
        seen_digit = true;
        i += 1;
    }
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            digits.push(bytes[i]);
            exp -= 1;
            seen_digit = true;
            i += 1;
        }
    }
    if !seen_digit {
        return None;
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        let sign: i64 = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                -1
            }
            Some(b'+') => {
                i += 1;
                1
            }
            _ => 1,
        };
        let mut e: i64 = 0;
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            e = e
                .saturating_mul(10)
                .saturating_add((bytes[i] - b'0') as i64);
            i += 1;
        }
        if i == start {
            return None;
        }
        exp = exp.saturating_add(sign * e);
    }
    if i != bytes.len() {
        return None;
    }
    let lead = digits.iter().take_while(|d| **d == b'0').count();
    digits.drain(..lead);
    let trail = digits.iter().rev().take_while(|d| **d == b'0').count();
    digits.truncate(digits.len() - trail);
    exp = exp.saturating_add(trail as i64);
    if digits.is_empty() {
        exp = 0;
    }
    Some(Decimal {
        negative: negative && !digits.is_empty(),
        digits,
        exp,
    })
}

/// Whether two JSON number texts have the same value (`1.0` and `1`).
#[cfg(test)]
pub fn same_value(a: &str, b: &str) -> bool {
    parse(a).is_some() && parse(a) == parse(b)
}

/// Appends the canonical text of the JSON number `text` to `out`.
#[cfg(any(test, feature = "pg_test"))]
pub fn canonical(text: &str, out: &mut String) {
    if short(text.as_bytes(), out) {
        return;
    }
    general(text, out);
}

/// The commonest case in place: `text` in plain form (`-`, integer
/// digits without leading zeros, optionally `.` and fraction digits, as
/// numeric prints a number) whose canonical text is itself without
/// trailing fraction zeros: at most 15 significant digits and a decimal
/// point between 21 places left of the first digit and 6 right of it
/// (ECMA-262's n in -5..=21), where `short`'s rules print the digits as
/// they are. Trims `text` to that and returns true; otherwise leaves it
/// alone and returns false.
pub fn trim_plain(text: &mut Vec<u8>) -> bool {
    let negative = text.first() == Some(&b'-');
    let start = negative as usize;
    let mut int_end = start;
    while int_end < text.len() && text[int_end].is_ascii_digit() {
        int_end += 1;
    }
    let int_len = int_end - start;
    if int_len == 0 || (int_len > 1 && text[start] == b'0') || int_len > 21 {
        return false;
    }
    let mut end = text.len();
    if int_end < end {
        if text[int_end] != b'.' || !text[int_end + 1..].iter().all(u8::is_ascii_digit) {
            return false;
        }
        while end > int_end + 1 && text[end - 1] == b'0' {
            end -= 1;
        }
        if end == int_end + 1 {
            end = int_end;
        }
    }
    let frac = end.saturating_sub(int_end + 1);
    let significant = if text[start] != b'0' {
        // Trailing zeros of an integer are not significant.
        let int_zeros = if frac == 0 {
            text[start..int_end]
                .iter()
                .rev()
                .take_while(|d| **d == b'0')
                .count()
        } else {
            0
        };
        int_len - int_zeros + frac
    } else if frac == 0 {
        // Zero: "0" (numeric has no negative zero, but "-0" is zero too).
        text.truncate(1);
        text[0] = b'0';
        return true;
    } else {
        let zeros = text[int_end + 1..end]
            .iter()
            .take_while(|d| **d == b'0')
            .count();
        if zeros > 5 {
            return false;
        }
        frac - zeros
    };
    if significant > 15 {
        return false;
    }
    text.truncate(end);
    true
}

/// `canonical` of number text given as bytes (jsonb's numbers are ASCII).
pub fn canonical_bytes(text: &[u8], out: &mut String) {
    if short(text, out) {
        return;
    }
    match std::str::from_utf8(text) {
        Ok(text) => general(text, out),
        // Not number text: jsonb and serde_json only hold valid numbers.
        Err(_) => out.push_str(&String::from_utf8_lossy(text)),
    }
}

/// Any number text, by its value.
fn general(text: &str, out: &mut String) {
    let Some(dec) = parse(text) else {
        // Not number text: jsonb and serde_json only hold valid numbers.
        out.push_str(text);
        return;
    };
    if dec.digits.is_empty() {
        out.push('0');
        return;
    }
    // Rust reads decimal text into the nearest double, ties to even, at any
    // length (or infinity beyond the range).
    if let Ok(d) = text.parse::<f64>() {
        if d.is_finite() && d != 0.0 {
            let es = es_number(d);
            if parse(&es).as_ref() == Some(&dec) {
                out.push_str(&es);
                return;
            }
        }
    }
    exact(&dec, out);
}

/// The common case without allocating: plain decimal text (no exponent, as
/// jsonb prints numbers) with at most 15 significant digits, well inside a
/// double's normal range. Every such decimal reads into a double whose
/// shortest text has exactly its digits (a double tells any two decimals of
/// 15 digits apart: DBL_DIG), so its RFC 8785 text is those digits laid out
/// as ECMAScript lays them out, and has its value. Returns false, writing
/// nothing, for any other text.
fn short(bytes: &[u8], out: &mut String) -> bool {
    let negative = bytes.first() == Some(&b'-');
    let body = &bytes[negative as usize..];
    if body.is_empty() || body.len() > 40 {
        return false;
    }
    // Significant digits (without leading or trailing zeros), and the
    // position of the decimal point relative to them.
    let mut digits = [0u8; 40];
    let mut k = 0usize;
    let mut point: Option<usize> = None;
    let mut leading = true;
    // Count of digits seen before the point, leading zeros excluded, and
    // zeros after the point before the first significant digit.
    let mut int_digits: i64 = 0;
    let mut frac_zeros: i64 = 0;
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                if leading && b == b'0' {
                    if point.is_some() {
                        frac_zeros += 1;
                    }
                    continue;
                }
                leading = false;
                digits[k] = b;
                k += 1;
                if point.is_none() {
                    int_digits += 1;
                }
            }
            b'.' if point.is_none() && i > 0 => point = Some(i),
            _ => return false,
        }
    }
    if point == Some(body.len() - 1) {
        return false;
    }
    // Trailing zeros are not significant.
    let mut sig = k;
    while sig > 0 && digits[sig - 1] == b'0' {
        sig -= 1;
    }
    if sig == 0 {
        out.push('0');
        return true;
    }
    if sig > 15 {
        return false;
    }
    // n: the value is 0.d1d2...dk × 10^n (ECMA-262's n).
    let n: i64 = if int_digits > 0 {
        int_digits
    } else {
        -frac_zeros
    };
    if !(-300..=300).contains(&n) {
        return false;
    }
    let d = std::str::from_utf8(&digits[..sig]).expect("ASCII digits");
    let k = sig as i64;
    if negative {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(d);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&d[..n as usize]);
        out.push('.');
        out.push_str(&d[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(d);
    } else {
        out.push_str(&d[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&d[1..]);
        }
        let e = n - 1;
        out.push('e');
        out.push(if e >= 0 { '+' } else { '-' });
        let _ = std::fmt::Write::write_fmt(out, format_args!("{}", e.abs()));
    }
    true
}

/// The exact decimal: no exponent, no leading zeros, no trailing zeros
/// after the point.
fn exact(dec: &Decimal, out: &mut String) {
    if dec.negative {
        out.push('-');
    }
    let digits = std::str::from_utf8(&dec.digits).expect("ASCII digits");
    let len = digits.len() as i64;
    if dec.exp >= 0 {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', dec.exp as usize));
    } else if -dec.exp < len {
        let point = (len + dec.exp) as usize;
        out.push_str(&digits[..point]);
        out.push('.');
        out.push_str(&digits[point..]);
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-dec.exp - len) as usize));
        out.push_str(digits);
    }
}

/// ECMAScript's Number::toString(x) for a finite double (ECMA-262, 7.1.12.1).
pub fn es_number(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string(); // also -0
    }
    let sign = if f < 0.0 { "-" } else { "" };
    // The spec asks for the fewest digits that round-trip and, of those, the
    // ones closest to the exact value, the even one on a tie. `{:e}` finds
    // how few digits suffice; formatting again with exactly that many picks
    // the closest, rounding half to even (1424953923781206.25 prints as
    // ...206.2, where the shortest mode alone gives ...206.3).
    let shortest = format!("{:e}", f.abs());
    let k = shortest
        .split_once('e')
        .expect("LowerExp has an exponent")
        .0
        .replace('.', "")
        .len();
    let sci = format!("{:.*e}", k - 1, f.abs());
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let digits = match digits.trim_end_matches('0') {
        "" => "0".to_string(),
        d => d.to_string(),
    };
    let k = digits.len() as i32;
    let n = exp + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let e_sign = if e >= 0 { '+' } else { '-' };
        let m = if k == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        format!("{m}e{e_sign}{}", e.abs())
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod unit {
    use super::*;

    fn canon(text: &str) -> String {
        let mut out = String::new();
        canonical(text, &mut out);
        out
    }

    /// The number table of RFC 8785, Appendix B (IEEE 754 bit patterns):
    /// every double prints as RFC 8785 prints it, and so does the text it
    /// prints as.
    #[test]
    fn rfc8785_appendix_b_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in cases {
            let f = f64::from_bits(*bits);
            assert_eq!(es_number(f), *want, "bits {bits:#018x}");
            assert_eq!(canon(want), *want, "{want} is its own canonical text");
        }
    }

    /// The in-place path gives what the general one gives, and refuses
    /// what is not plain.
    #[test]
    fn trim_plain_agrees() {
        let mut next = crate::canonical::xorshift(0x2545_f491_4f6c_dd1d);
        let mut trimmed = 0;
        for _ in 0..300_000 {
            let digits = (next() % 10u64.pow(1 + (next() % 19) as u32)).to_string();
            let zeros = "0".repeat((next() % 12) as usize);
            let more = (next() % 1000).to_string();
            let text = match next() % 5 {
                0 => digits.clone(),
                1 => format!("{digits}{zeros}"),
                2 => format!("0.{zeros}{digits}"),
                3 => format!("{digits}.{zeros}{more}{zeros}"),
                _ => format!("{digits}.{more}"),
            };
            let text = if next().is_multiple_of(2) {
                format!("-{text}")
            } else {
                text
            };
            let mut want = String::new();
            canonical(&text, &mut want);
            let mut bytes = text.clone().into_bytes();
            if trim_plain(&mut bytes) {
                trimmed += 1;
                assert_eq!(String::from_utf8(bytes).unwrap(), want, "{text}");
            } else {
                assert_eq!(bytes, text.as_bytes(), "{text} left alone");
            }
        }
        assert!(trimmed > 100_000, "{trimmed}");
        for text in [
            "1e5", "1E5", "01", "-", "", ".5", "1.", "1.2.3", "+1", "1.5e3", "00",
        ] {
            let mut bytes = text.as_bytes().to_vec();
            if trim_plain(&mut bytes) {
                let mut want = String::new();
                canonical(text, &mut want);
                assert_eq!(String::from_utf8(bytes).unwrap(), want, "{text}");
            } else {
                assert_eq!(bytes, text.as_bytes());
            }
        }
    }

    /// The allocation-free path gives what the general one gives.
    #[test]
    fn short_path_agrees() {
        let mut next = crate::canonical::xorshift(0x9e3779b97f4a7c15);
        for _ in 0..200_000 {
            let digits = (next() % 10u64.pow(1 + (next() % 16) as u32)).to_string();
            let point = (next() % 40) as usize;
            let zeros = "0".repeat((next() % 25) as usize);
            let text = match next() % 4 {
                0 => digits.clone(),
                1 => format!("{digits}{zeros}"),
                2 => format!("0.{zeros}{digits}"),
                _ if point < digits.len() => {
                    format!("{}.{}", &digits[..point.max(1)], &digits[point.max(1)..])
                }
                _ => format!("{digits}.{zeros}"),
            };
            let text = if next().is_multiple_of(2) {
                format!("-{text}")
            } else {
                text
            };
            let mut fast = String::new();
            if short(text.as_bytes(), &mut fast) {
                let dec = parse(&text).expect("number");
                let mut slow = String::new();
                if dec.digits.is_empty() {
                    slow.push('0');
                } else {
                    let d: f64 = text.parse().unwrap();
                    let es = es_number(d);
                    assert_eq!(
                        parse(&es).as_ref(),
                        Some(&dec),
                        "{text}: {es} has another value"
                    );
                    slow = es;
                }
                assert_eq!(fast, slow, "{text}");
            }
        }
    }

    #[test]
    fn numbers_a_double_holds_as_rfc8785_prints_them() {
        for (text, want) in [
            ("0.1", "0.1"),
            ("19.99", "19.99"),
            ("4.50", "4.5"),
            ("1E30", "1e+30"),
            ("2e-3", "0.002"),
            ("0.000000000000000000000000001", "1e-27"),
            ("-0", "0"),
            ("-0.000", "0"),
            ("1.0", "1"),
            ("100", "100"),
            ("1e21", "1e+21"),
            ("123456789012345680000", "123456789012345680000"),
            ("-12.5", "-12.5"),
        ] {
            assert_eq!(canon(text), want, "{text}");
        }
    }

    #[test]
    fn numbers_a_double_does_not_hold_keep_their_value() {
        for (text, want) in [
            ("9007199254740993", "9007199254740993"),
            ("-9007199254740993", "-9007199254740993"),
            (
                "0.1000000000000000055511151231257827",
                "0.1000000000000000055511151231257827",
            ),
            ("333333333.33333329", "333333333.33333329"),
            ("1234567890123456789", "1234567890123456789"),
            // 2^68 exactly: RFC 8785 prints 295147905179352830000 for it,
            // the text of another number.
            ("295147905179352825856", "295147905179352825856"),
            ("12345678901234567890.5", "12345678901234567890.5"),
            ("2.500000000000000000001", "2.500000000000000000001"),
            // Rust prints this double as ...206.3, a tie that ECMAScript (and
            // so RFC 8785) breaks towards ...206.2: ...206.3 is another number.
            ("1424953923781206.3", "1424953923781206.3"),
        ] {
            assert_eq!(canon(text), want, "{text}");
        }
        assert_eq!(canon("1e-400"), format!("0.{}1", "0".repeat(399)));
        let big = format!("1{}", "0".repeat(400));
        assert_eq!(canon(&big), big);
        assert_eq!(canon("1e400"), big);
        assert_eq!(canon("1.5E+2"), "150");
    }
}
