//! SentencePiece models (`tokenizer.model`), read and run natively, as the `sentencepiece`
//! library does: the model protobuf, the normalizer (the precompiled character map, a
//! darts-clone double-array trie, plus the whitespace rules), and the two segmentation
//! algorithms (unigram Viterbi and BPE merges), with byte fallback and user-defined symbols.
//! Apple's AFM tokenizer (tamm's `AFMTokenizer`) is a SentencePiece model whose text has "\n"
//! replaced by the user-defined symbol `<n>` first.

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use crate::error::{Result, TextError};

/// The kind of a piece (SentencePiece's `ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Unigram,
    Bpe,
}

/// A SentencePiece model.
#[derive(Debug, Clone)]
pub struct SpmModel {
    pub pieces: Vec<Piece>,
    pub algorithm: Algorithm,
    pub byte_fallback: bool,
    pub unk_id: u32,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    /// Double-array trie units and the NUL-terminated replacement strings.
    charsmap: Option<(Vec<u32>, Vec<u8>)>,
    ids: HashMap<String, u32>,
    /// User-defined symbols, longest first (matched before normalization).
    user_defined: Vec<String>,
    /// `<0xXX>` piece ids.
    bytes: [Option<u32>; 256],
    max_piece_chars: usize,
    min_score: f32,
    max_score: f32,
}

/// A minimal protobuf reader (wire types 0, 1, 2, 5).
struct Proto<'a> {
    b: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
    Fixed64,
}

impl<'a> Proto<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    fn next(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        };
        Ok(Some((num, f)))
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

fn utf8(b: &[u8], what: &str) -> std::result::Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

impl SpmModel {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TextError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|m| {
            TextError::Tokenizer(format!(
                "{}: not a SentencePiece model ({m})",
                path.display()
            ))
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut pieces = Vec::new();
        let mut algorithm = Algorithm::Unigram;
        let (mut byte_fallback, mut unk, mut bos, mut eos, mut pad) =
            (false, 0i64, 1i64, 2i64, -1i64);
        let (mut dummy, mut extra_ws, mut escape) = (true, true, true);
        let mut charsmap: Option<Vec<u8>> = None;
        let mut p = Proto { b: bytes, pos: 0 };
        while let Some((num, f)) = p.next()? {
            match (num, f) {
                (1, Field::Bytes(b)) => {
                    let mut q = Proto { b, pos: 0 };
                    let (mut piece, mut score, mut kind) = (None, 0f32, PieceType::Normal);
                    while let Some((n, f)) = q.next()? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => piece = Some(utf8(s, "a piece")?),
                            (2, Field::Fixed32(x)) => score = f32::from_bits(x),
                            (3, Field::Varint(t)) => {
                                kind = match t {
                                    1 => PieceType::Normal,
                                    2 => PieceType::Unknown,
                                    3 => PieceType::Control,
                                    4 => PieceType::UserDefined,
                                    5 => PieceType::Unused,
                                    6 => PieceType::Byte,
                                    other => return Err(format!("unknown piece type {other}")),
                                }
                            }
                            _ => {}
                        }
                    }
                    pieces.push(Piece {
                        piece: piece.ok_or("a piece without text")?,
                        score,
                        kind,
                    });
                }
                (2, Field::Bytes(b)) => {
                    let mut q = Proto { b, pos: 0 };
                    while let Some((n, f)) = q.next()? {
                        match (n, f) {
                            (3, Field::Varint(t)) => {
                                algorithm = match t {
                                    1 => Algorithm::Unigram,
                                    2 => Algorithm::Bpe,
                                    other => {
                                        return Err(format!(
                                            "model type {other} is not supported (unigram or BPE)"
                                        ))
                                    }
                                }
                            }
                            (35, Field::Varint(v)) => byte_fallback = v != 0,
                            (40, Field::Varint(v)) => unk = v as i32 as i64,
                            (41, Field::Varint(v)) => bos = v as i32 as i64,
                            (42, Field::Varint(v)) => eos = v as i32 as i64,
                            (43, Field::Varint(v)) => pad = v as i32 as i64,
                            (24, Field::Varint(v)) if v != 0 => {
                                return Err("treat_whitespace_as_suffix is not supported".into())
                            }
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut q = Proto { b, pos: 0 };
                    while let Some((n, f)) = q.next()? {
                        match (n, f) {
                            (2, Field::Bytes(m)) if !m.is_empty() => charsmap = Some(m.to_vec()),
                            (3, Field::Varint(v)) => dummy = v != 0,
                            (4, Field::Varint(v)) => extra_ws = v != 0,
                            (5, Field::Varint(v)) => escape = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        let charsmap = match charsmap {
            Some(m) => {
                if m.len() < 4 {
                    return Err("precompiled_charsmap too short".into());
                }
                let n = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
                if !n.is_multiple_of(4) || 4 + n > m.len() {
                    return Err("bad precompiled_charsmap".into());
                }
                let units = m[4..4 + n]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Some((units, m[4 + n..].to_vec()))
            }
            None => None,
        };
        let id = |v: i64| {
            u32::try_from(v)
                .ok()
                .filter(|&i| (i as usize) < pieces.len())
        };
        let mut ids = HashMap::new();
        let mut bytes_ = [None; 256];
        let mut user_defined = Vec::new();
        // As sentencepiece (FLT_MAX / FLT_MIN over normal pieces): user-defined symbols score
        // `len · max_score − 0.1`, with max_score ≥ FLT_MIN > 0.
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN_POSITIVE);
        let mut max_piece_chars = 1;
        for (i, p) in pieces.iter().enumerate() {
            ids.entry(p.piece.clone()).or_insert(i as u32);
            match p.kind {
                PieceType::Byte => {
                    let b = p
                        .piece
                        .strip_prefix("<0x")
                        .and_then(|s| s.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("bad byte piece {:?}", p.piece))?;
                    bytes_[b as usize] = Some(i as u32);
                }
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Normal => {
                    min_score = min_score.min(p.score);
                    max_score = max_score.max(p.score);
                    max_piece_chars = max_piece_chars.max(p.piece.chars().count());
                }
                _ => {}
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(SpmModel {
            unk_id: id(unk).ok_or("unk_id is not a piece")?,
            bos_id: id(bos),
            eos_id: id(eos),
            pad_id: id(pad),
            pieces,
            algorithm,
            byte_fallback,
            add_dummy_prefix: dummy,
            remove_extra_whitespaces: extra_ws,
            escape_whitespaces: escape,
            charsmap,
            ids,
            user_defined,
            bytes: bytes_,
            max_piece_chars,
            min_score: if min_score == f32::MAX {
                0.0
            } else {
                min_score
            },
            max_score,
        })
    }

    /// Append user-defined symbols (tamm's `user_defined_tokens`), as SentencePiece does.
    pub fn add_user_defined(&mut self, tokens: &[String]) {
        for t in tokens {
            let id = self.pieces.len() as u32;
            self.pieces.push(Piece {
                piece: t.clone(),
                score: 0.0,
                kind: PieceType::UserDefined,
            });
            self.ids.entry(t.clone()).or_insert(id);
            self.user_defined.push(t.clone());
        }
        self.user_defined
            .sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Longest charsmap entry that prefixes `s`: (bytes matched, replacement).
    fn charsmap_prefix<'s>(&'s self, s: &[u8]) -> Option<(usize, &'s [u8])> {
        let (units, strings) = self.charsmap.as_ref()?;
        // darts-clone commonPrefixSearch.
        let unit = |i: usize| units.get(i).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let mut node = 0usize;
        let mut u = unit(node)?;
        node ^= offset(u);
        let mut best = None;
        for (i, &c) in s.iter().enumerate() {
            if c == 0 {
                break;
            }
            node ^= c as usize;
            u = unit(node)?;
            if (u & ((1 << 31) | 0xff)) != c as u32 {
                break;
            }
            node ^= offset(u);
            if (u >> 8) & 1 == 1 {
                let value = (unit(node)? & 0x7fff_ffff) as usize;
                best = Some((i + 1, value));
            }
        }
        let (len, value) = best?;
        let rest = strings.get(value..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Some((len, &rest[..end]))
    }

    /// One normalization step at the start of `s`: (normalized text, bytes consumed).
    fn normalize_prefix<'s>(&'s self, s: &'s str) -> (std::borrow::Cow<'s, str>, usize) {
        for u in &self.user_defined {
            if s.starts_with(u.as_str()) {
                return (std::borrow::Cow::Borrowed(u.as_str()), u.len());
            }
        }
        if let Some((n, rep)) = self.charsmap_prefix(s.as_bytes()) {
            if let Ok(r) = std::str::from_utf8(rep) {
                return (std::borrow::Cow::Owned(r.to_string()), n);
            }
        }
        let n = s.chars().next().map_or(1, char::len_utf8);
        (std::borrow::Cow::Borrowed(&s[..n]), n)
    }

    /// SentencePiece's normalizer (Normalizer::Normalize).
    pub fn normalize(&self, input: &str) -> String {
        let mut s = input;
        let mut out = String::with_capacity(input.len() + 4);
        if self.remove_extra_whitespaces {
            while !s.is_empty() {
                let (p, n) = self.normalize_prefix(s);
                if p != " " {
                    break;
                }
                s = &s[n..];
            }
        }
        if s.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces {
            "\u{2581}"
        } else {
            " "
        };
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !s.is_empty() {
            let (p, n) = self.normalize_prefix(s);
            let mut sp: &str = &p;
            while prev_space && sp.starts_with(' ') {
                sp = &sp[1..];
            }
            if !sp.is_empty() {
                for c in sp.chars() {
                    if self.escape_whitespaces && c == ' ' {
                        out.push('\u{2581}');
                    } else {
                        out.push(c);
                    }
                }
                prev_space = sp.ends_with(' ');
            }
            s = &s[n..];
            prev_space = prev_space && self.remove_extra_whitespaces;
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    fn is_user_defined(&self, id: u32) -> bool {
        self.pieces[id as usize].kind == PieceType::UserDefined
    }

    /// A piece that segmentation may produce (not control, unused, byte or unknown).
    fn segment_id(&self, s: &str) -> Option<u32> {
        let id = self.piece_to_id(s)?;
        matches!(
            self.pieces[id as usize].kind,
            PieceType::Normal | PieceType::UserDefined
        )
        .then_some(id)
    }

    /// Token ids of `text` (no BOS/EOS), as `SentencePieceProcessor::Encode`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalize(text);
        let pieces: Vec<(String, Option<u32>)> = match self.algorithm {
            Algorithm::Unigram => self.viterbi(&norm),
            Algorithm::Bpe => self.bpe(&norm),
        };
        let mut out = Vec::with_capacity(pieces.len());
        let mut prev_unk = false;
        for (s, id) in pieces {
            match id {
                Some(i) if i != self.unk_id => {
                    out.push(i);
                    prev_unk = false;
                }
                _ if self.byte_fallback => {
                    for b in s.bytes() {
                        out.push(self.bytes[b as usize].unwrap_or(self.unk_id));
                    }
                    prev_unk = false;
                }
                _ => {
                    // Consecutive unknown pieces merge into one.
                    if !prev_unk {
                        out.push(self.unk_id);
                    }
                    prev_unk = true;
                }
            }
        }
        out
    }

    /// Unigram segmentation: the best-scoring path (unigram_model.cc, EncodeOptimized).
    fn viterbi(&self, norm: &str) -> Vec<(String, Option<u32>)> {
        const UNK_PENALTY: f32 = 10.0;
        let bounds: Vec<usize> = norm
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(norm.len()))
            .collect();
        let n = bounds.len() - 1;
        // best[i]: (score, start char, piece id or None for unknown) of the best path to char i.
        let mut best: Vec<(f32, usize, Option<u32>)> = vec![(f32::MIN, 0, None); n + 1];
        best[0].0 = 0.0;
        let unk_score = self.min_score - UNK_PENALTY;
        // The longest candidate, once per call (not per position).
        let longest = self.max_piece_chars.max(self.longest_user_defined());
        for start in 0..n {
            let base = best[start].0;
            if base == f32::MIN {
                continue;
            }
            let mut single = false;
            for len in 1..=longest.min(n - start) {
                let piece = &norm[bounds[start]..bounds[start + len]];
                let Some(id) = self.segment_id(piece) else {
                    continue;
                };
                let score = if self.is_user_defined(id) {
                    piece.len() as f32 * self.max_score - 0.1
                } else {
                    self.pieces[id as usize].score
                };
                if len == 1 {
                    single = true;
                }
                let cand = base + score;
                if cand > best[start + len].0 {
                    best[start + len] = (cand, start, Some(id));
                }
            }
            if !single {
                let cand = base + unk_score;
                if cand > best[start + 1].0 {
                    best[start + 1] = (cand, start, None);
                }
            }
        }
        let mut out = Vec::new();
        let mut end = n;
        while end > 0 {
            let (_, start, id) = best[end];
            out.push((norm[bounds[start]..bounds[end]].to_string(), id));
            end = start;
        }
        out.reverse();
        out
    }

    fn longest_user_defined(&self) -> usize {
        self.user_defined
            .iter()
            .map(|u| u.chars().count())
            .max()
            .unwrap_or(1)
    }

    /// BPE segmentation: merge the adjacent pair whose union is the best-scoring piece, leftmost
    /// first on ties (bpe_model.cc); user-defined symbols are never split or merged.
    fn bpe(&self, norm: &str) -> Vec<(String, Option<u32>)> {
        // Initial symbols: characters, with user-defined symbols kept whole.
        let mut syms: Vec<String> = Vec::new();
        let mut fixed: Vec<bool> = Vec::new();
        let mut s = norm;
        'outer: while !s.is_empty() {
            for u in &self.user_defined {
                if s.starts_with(u.as_str()) {
                    syms.push(u.clone());
                    fixed.push(true);
                    s = &s[u.len()..];
                    continue 'outer;
                }
            }
            let n = s.chars().next().map_or(1, char::len_utf8);
            syms.push(s[..n].to_string());
            fixed.push(false);
            s = &s[n..];
        }
        let len = syms.len();
        if len == 0 {
            return Vec::new();
        }
        let mut prev: Vec<isize> = (0..len as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (0..len as isize).map(|i| i + 1).collect();
        next[len.saturating_sub(1)] = -1;
        let mut alive = vec![true; len];
        // (score, -left) max-heap: best score first, then leftmost.
        #[derive(PartialEq)]
        struct Cand(f32, isize, usize, usize, String);
        impl Eq for Cand {}
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then_with(|| o.2.cmp(&self.2))
            }
        }
        let mut heap = BinaryHeap::new();
        let push =
            |heap: &mut BinaryHeap<Cand>, syms: &[String], fixed: &[bool], l: usize, r: usize| {
                if fixed[l] || fixed[r] {
                    return;
                }
                let merged = format!("{}{}", syms[l], syms[r]);
                if let Some(id) = self.segment_id(&merged) {
                    if !self.is_user_defined(id) {
                        heap.push(Cand(self.pieces[id as usize].score, 0, l, r, merged));
                    }
                }
            };
        for i in 1..len {
            push(&mut heap, &syms, &fixed, i - 1, i);
        }
        while let Some(Cand(_, _, l, r, merged)) = heap.pop() {
            // Stale candidates: a side was merged away or changed since.
            if !alive[l]
                || !alive[r]
                || next[l] != r as isize
                || format!("{}{}", syms[l], syms[r]) != merged
            {
                continue;
            }
            syms[l] = merged;
            alive[r] = false;
            next[l] = next[r];
            if next[r] >= 0 {
                prev[next[r] as usize] = l as isize;
            }
            if prev[l] >= 0 {
                push(&mut heap, &syms, &fixed, prev[l] as usize, l);
            }
            if next[l] >= 0 {
                push(&mut heap, &syms, &fixed, l, next[l] as usize);
            }
        }
        let mut out = Vec::new();
        let mut i = if len > 0 { 0isize } else { -1 };
        while i >= 0 {
            let s = &syms[i as usize];
            out.push((s.clone(), self.segment_id(s)));
            i = next[i as usize];
        }
        out
    }

    /// Text of token ids, as `SentencePieceProcessor::Decode`: byte pieces reassembled, `▁` as
    /// spaces, the dummy-prefix space removed, control tokens dropped, unknown as " ⁇ ".
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        // Byte pieces become UTF-8; as sentencepiece, every byte of an invalid sequence becomes
        // its own U+FFFD.
        let flush = |bytes: &mut Vec<u8>, out: &mut String| {
            let mut rest: &[u8] = bytes;
            while !rest.is_empty() {
                match std::str::from_utf8(rest) {
                    Ok(s) => {
                        out.push_str(s);
                        rest = &[];
                    }
                    Err(e) => {
                        let ok = e.valid_up_to();
                        out.push_str(std::str::from_utf8(&rest[..ok]).unwrap_or_default());
                        out.push('\u{fffd}');
                        rest = &rest[ok + 1..];
                    }
                }
            }
            bytes.clear();
        };
        for &id in ids {
            let Some(p) = self.pieces.get(id as usize) else {
                continue;
            };
            match p.kind {
                PieceType::Byte => {
                    if let Some(b) = p
                        .piece
                        .strip_prefix("<0x")
                        .and_then(|s| s.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                PieceType::Control => flush(&mut bytes, &mut out),
                PieceType::Unknown => {
                    flush(&mut bytes, &mut out);
                    out.push_str(" \u{2047} ");
                }
                _ => {
                    flush(&mut bytes, &mut out);
                    out.push_str(&p.piece);
                }
            }
        }
        flush(&mut bytes, &mut out);
        let mut text = out.replace('\u{2581}', " ");
        if self.add_dummy_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}
