//! A structural check of JPEG streams: walk the marker segments and entropy-coded data from SOI
//! to EOI. Decoders fill a truncated JPEG with grey and report success; this scan lets the loader
//! reject such files instead. Bytes after EOI (e.g. appended motion-photo video) are ignored.

/// Whether `data` holds a JPEG stream that reaches its EOI marker.
pub fn jpeg_is_complete(data: &[u8]) -> bool {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    loop {
        // Find the next marker. Stray bytes between segments are skipped as libjpeg does
        // ("extraneous bytes before marker"); fill bytes 0xFF are skipped too.
        match data
            .get(i..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
        {
            Some(pos) => i += pos,
            None => return false,
        }
        while i < data.len() && data[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = data.get(i) else {
            return false;
        };
        i += 1;
        match marker {
            0xD9 => return true,            // EOI
            0x01 | 0xD0..=0xD7 => continue, // stand-alone markers
            _ => {}
        }
        // A segment with a 16-bit length (which includes the length bytes).
        let Some(len) = data
            .get(i..i + 2)
            .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
        else {
            return false;
        };
        if len < 2 {
            return false;
        }
        i += len;
        if i > data.len() {
            return false;
        }
        if marker == 0xDA {
            // Start of scan: entropy-coded data up to the next marker other than RSTn / stuffing.
            loop {
                let Some(pos) = data[i..].iter().position(|&b| b == 0xFF) else {
                    return false;
                };
                i += pos;
                let Some(&next) = data.get(i + 1) else {
                    return false;
                };
                match next {
                    0x00 | 0xD0..=0xD7 | 0xFF => i += if next == 0xFF { 1 } else { 2 },
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_and_truncated() {
        // SOI, DQT-like segment, SOS with data containing stuffing and RST, EOI, trailing data.
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x04, 1, 2];
        j.extend_from_slice(&[
            0xFF, 0xDA, 0x00, 0x03, 9, 1, 2, 0xFF, 0x00, 3, 0xFF, 0xD0, 4,
        ]);
        let complete = [j.as_slice(), &[0xFF, 0xD9, 7, 7]].concat();
        assert!(jpeg_is_complete(&complete));
        // Stray bytes between segments are tolerated.
        let mut padded = j[..8].to_vec();
        padded.extend_from_slice(&[0, 0, 0]);
        padded.extend_from_slice(&complete[8..]);
        assert!(jpeg_is_complete(&padded));
        for cut in 0..complete.len() - 2 {
            assert!(!jpeg_is_complete(&complete[..cut]), "cut at {cut}");
        }
    }
}
