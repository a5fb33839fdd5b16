//! PyTorch checkpoints (`torch.save`, the zip format of PyTorch 1.6 and later): the
//! index of the tensors of a state dict, each a byte range of the file.
//!
//! `data.pkl` is read by a small pickle machine that executes nothing: the functions
//! PyTorch uses to rebuild tensors, parameters and ordered dicts are interpreted, any
//! other global becomes an inert placeholder, so a file can neither run code nor make
//! this reader do more work than its size allows (every value is shared, not copied).
//! Storages are the archive's uncompressed records, read in place.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::ops::Range;
use std::rc::Rc;

use safetensors::tensor::Dtype;

use super::file::Entry;

/// A storage record of the archive: its bytes and the CRC-32 the archive gives them.
pub(super) struct Record {
    pub range: Range<usize>,
    pub crc32: u32,
}

/// Every tensor of the checkpoint by its state-dict name (nested dicts joined with `.`).
pub(super) struct Index {
    pub tensors: BTreeMap<String, Entry>,
    pub records: Vec<Record>,
    /// Names whose value this reader does not take (quantized, sparse or strided
    /// tensors, say), each with the reason: an error if asked for.
    pub unsupported: BTreeMap<String, String>,
}

/// Whether `bytes` start as a zip archive (PyTorch's format since 1.6).
pub(super) fn is_archive(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Whether `bytes` start as PyTorch's legacy (before 1.6) serialization: a protocol-2
/// pickle of its magic number 0x1950a86a20f9469cfc6c.
pub(super) fn is_legacy(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")
}

/// Dicts or tuples nested deeper than this are refused (a pickle can make a dict hold
/// itself, and a tuple nested as deep as the file is long would overflow the stack
/// when dropped).
const MAX_DEPTH: usize = 32;

/// Tensors of more dimensions are refused (PyTorch's kernels take at most 25).
const MAX_RANK: usize = 64;

/// Longer names of globals are cut in messages.
const MAX_NAME: usize = 128;

pub(super) fn index(bytes: &[u8]) -> Result<Index, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip archive: {e}"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    // The records live under one folder, named after the file when it was saved.
    let pkl = names
        .iter()
        .filter(|n| *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
        .min_by_key(|n| n.len())
        .ok_or("a zip archive without data.pkl is not a PyTorch checkpoint")?;
    let root = pkl[..pkl.len() - "data.pkl".len()].to_string();
    let mut record = |name: &str| -> Result<Option<Record>, String> {
        let Some(i) = zip.index_for_name(name) else {
            return Ok(None);
        };
        let file = zip
            .by_index_raw(i)
            .map_err(|e| format!("record {name}: {e}"))?;
        if file.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "record {name} is compressed; PyTorch stores records uncompressed, so the \
                 file was repacked: save it again with torch.save"
            ));
        }
        let start = file
            .data_start()
            .ok_or_else(|| format!("record {name}: no data offset"))?;
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(file.size()).ok())
            .and_then(|(s, n)| Some(s..s.checked_add(n)?))
            .filter(|r| r.end <= bytes.len())
            .ok_or_else(|| format!("record {name} lies outside the file"))?;
        Ok(Some(Record {
            range,
            crc32: file.crc32(),
        }))
    };
    if let Some(order) = record(&format!("{root}byteorder"))? {
        let order = &bytes[order.range];
        if order != b"little" {
            return Err(format!(
                "the checkpoint's byte order is {:?}; only little-endian is read",
                String::from_utf8_lossy(order)
            ));
        }
    }
    let pickle = record(pkl)?.ok_or("data.pkl vanished")?;
    let (root_value, machine) = Machine::run(&bytes[pickle.range.clone()])?;

    let mut index = Index {
        tensors: BTreeMap::new(),
        records: Vec::new(),
        unsupported: BTreeMap::new(),
    };
    if !matches!(root_value, Value::Dict(_)) {
        return Err(format!(
            "data.pkl holds {}, not a dict of tensors (a state dict)",
            root_value.kind()
        ));
    }
    let mut leaves = Vec::new();
    let mut budget = pickle
        .range
        .len()
        .saturating_mul(16)
        .saturating_add(1 << 20);
    machine.flatten(&root_value, String::new(), 0, &mut budget, &mut leaves)?;

    // Each storage's record, and the element type its first tensor reads it as.
    let mut records: HashMap<Rc<str>, (usize, Dtype)> = HashMap::new();
    for (name, value) in leaves {
        if index.tensors.remove(&name).is_some() || index.unsupported.contains_key(&name) {
            let why = format!("`{name}` names two values (keys joined with `.` read the same)");
            index.unsupported.insert(name, why);
            continue;
        }
        let why = match value {
            Value::Tensor(t) => match t.contiguous(&name) {
                Err(why) => why,
                Ok(numel) => {
                    let key = &t.storage.key;
                    let r = match records.get(key) {
                        Some(&(r, dtype)) if dtype == t.storage.dtype => r,
                        Some(_) => {
                            let why =
                                format!("`{name}` reads storage {key} as another element type");
                            index.unsupported.insert(name, why);
                            continue;
                        }
                        None => {
                            let path = format!("{root}data/{key}");
                            let rec = record(&path)?.ok_or_else(|| {
                                format!("tensor `{name}`'s storage {path} is not in the archive")
                            })?;
                            index.records.push(rec);
                            let r = index.records.len() - 1;
                            records.insert(key.clone(), (r, t.storage.dtype));
                            r
                        }
                    };
                    let entry = t.entry(&name, numel, r, &index.records[r])?;
                    index.tensors.insert(name, entry);
                    continue;
                }
            },
            Value::Opaque(what, made) => format!(
                "`{name}` is {}, not a dense tensor this reader takes",
                describe(&what, made)
            ),
            _ => continue,
        };
        index.unsupported.insert(name, why);
    }
    Ok(index)
}

/// A storage named by a persistent id: `('storage', torch.HalfStorage, key, location, numel)`.
struct Storage {
    dtype: Dtype,
    key: Rc<str>,
    numel: usize,
}

/// A dense tensor: a strided view of a storage.
struct Tensor {
    storage: Rc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl Tensor {
    /// The element count of a row-major tensor (a dimension of size 1, or any
    /// dimension of an empty tensor, may carry any stride, as in PyTorch), or why
    /// it is not one.
    fn contiguous(&self, name: &str) -> Result<usize, String> {
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", self.shape))?;
        let mut expected = 1;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if numel > 0 && n != 1 && s != expected {
                return Err(format!(
                    "tensor `{name}` is not contiguous (shape {:?}, strides {:?}); \
                     save `tensor.contiguous()` instead",
                    self.shape, self.stride
                ));
            }
            expected *= n; // at most numel
        }
        Ok(numel)
    }

    /// Where the `numel` elements of a contiguous tensor lie in the file.
    fn entry(
        &self,
        name: &str,
        numel: usize,
        record: usize,
        rec: &Record,
    ) -> Result<Entry, String> {
        let size = self.storage.dtype.bitsize() / 8; // storages hold whole bytes
        let bytes = rec.range.len();
        if self.storage.numel.checked_mul(size) != Some(bytes) {
            return Err(format!(
                "tensor `{name}`: its storage holds {bytes} bytes, not {} elements of {:?}",
                self.storage.numel, self.storage.dtype
            ));
        }
        let start = rec.range.start;
        let range = if numel == 0 {
            start..start
        } else {
            let end = self
                .offset
                .checked_add(numel)
                .filter(|&end| end <= self.storage.numel)
                .ok_or_else(|| {
                    format!(
                        "tensor `{name}` (offset {}, {numel} elements) reaches past its storage \
                         of {} elements",
                        self.offset, self.storage.numel
                    )
                })?;
            // In bounds: end <= numel, and numel * size is the record's length.
            start + self.offset * size..start + end * size
        };
        Ok(Entry {
            dtype: self.storage.dtype,
            shape: self.shape.clone(),
            range,
            record: Some(record),
        })
    }
}

/// The globals a state dict's pickle names; anything else is [`Value::Opaque`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    Size,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorType,
    StorageType(Dtype),
}

fn global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", "Size") => Global::Size,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => Global::TensorType,
        ("torch", storage) => Global::StorageType(match storage {
            "DoubleStorage" => Dtype::F64,
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::BOOL,
            _ => return None,
        }),
        _ => return None,
    })
}

#[derive(Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    /// Items, and how deep tuples nest in it (bounded: values drop recursively).
    Tuple(Rc<[Value]>, usize),
    /// Index into [`Machine::lists`].
    List(usize),
    /// Index into [`Machine::dicts`].
    Dict(usize),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
    /// What this reader does not interpret: a global (its name, cut to
    /// [`MAX_NAME`]), what calling one gave, or a storage of a type it does not take.
    /// The name is shared, never rebuilt, so that memory stays linear in the file.
    Opaque(Rc<str>, Made),
}

#[derive(Clone, Copy)]
enum Made {
    Named,
    Called,
    Storage,
}

/// How messages describe an object this reader does not interpret.
fn describe(name: &str, made: Made) -> String {
    match made {
        Made::Named => name.to_string(),
        Made::Called => format!("{name}(...)"),
        Made::Storage => format!("a tensor of {name}"),
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Bytes => "bytes",
            Value::Tuple(..) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Opaque(..) => "an object",
        }
    }

    fn usize(&self, what: &str) -> Result<usize, String> {
        match self {
            Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is negative")),
            other => Err(format!("{what} is {}, not an int", other.kind())),
        }
    }

    /// A tensor's sizes or strides: a tuple of at most [`MAX_RANK`] ints.
    fn dims(&self, what: &str) -> Result<Vec<usize>, String> {
        match self {
            Value::Tuple(t, _) if t.len() > MAX_RANK => Err(format!(
                "{what} has {} dimensions, more than the {MAX_RANK} read",
                t.len()
            )),
            Value::Tuple(t, _) => t.iter().map(|v| v.usize(what)).collect(),
            other => Err(format!("{what} is {}, not a tuple", other.kind())),
        }
    }
}

/// Take `units` from what [`Machine::flatten`] may still do.
fn charge(budget: &mut usize, units: usize) -> Result<(), String> {
    *budget = budget
        .checked_sub(units)
        .ok_or("containers shared under more names than the pickle's size allows")?;
    Ok(())
}

/// A tuple of `items`, refused when tuples would nest deeper than [`MAX_DEPTH`].
fn tuple(items: Vec<Value>) -> Result<Value, String> {
    let inner = items.iter().map(|v| match v {
        Value::Tuple(_, depth) => *depth,
        _ => 0,
    });
    let depth = 1 + inner.max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(format!("tuples nested deeper than {MAX_DEPTH}"));
    }
    Ok(Value::Tuple(items.into(), depth))
}

/// The pickle virtual machine (the subset of opcodes protocols 2 to 5 use for data).
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    lists: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| format!("data.pkl ends inside an opcode at byte {}", self.pos))?;
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn len(&mut self, width: usize) -> Result<usize, String> {
        let mut a = [0u8; 8];
        a[..width].copy_from_slice(self.take(width)?);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "a length past usize".to_string())
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("data.pkl ends inside a text opcode")?;
        let line =
            std::str::from_utf8(&rest[..n]).map_err(|_| "a text opcode that is not UTF-8")?;
        self.pos += n + 1;
        Ok(line)
    }

    fn str(&mut self, width: usize) -> Result<Value, String> {
        let n = self.len(width)?;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "a string that is not UTF-8")?;
        Ok(Value::Str(s.into()))
    }
}

impl Machine {
    fn run(bytes: &[u8]) -> Result<(Value, Machine), String> {
        let mut m = Machine {
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            lists: Vec::new(),
            dicts: Vec::new(),
        };
        let mut r = Reader { bytes, pos: 0 };
        loop {
            let at = r.pos;
            let op = r.u8()?;
            match op {
                0x80 => {
                    r.u8()?; // PROTO: any version; unknown opcodes are refused below
                }
                0x95 => {
                    r.take(8)?; // FRAME: a length hint
                }
                b'.' => {
                    let top = m.pop()?;
                    return Ok((top, m));
                }
                b'(' => m.marks.push(m.stack.len()),
                b'0' => {
                    // Right after a MARK, CPython's unpickler pops the mark.
                    if m.marks.last() == Some(&m.stack.len()) {
                        m.marks.pop();
                    } else {
                        m.pop()?;
                    }
                }
                b'1' => {
                    m.pop_mark()?;
                }
                b'2' => {
                    let top = m.stack.last().cloned().ok_or("DUP on an empty stack")?;
                    m.stack.push(top);
                }
                b'N' => m.stack.push(Value::None),
                0x88 | 0x89 => m.stack.push(Value::Bool),
                b'I' => {
                    let line = r.line()?;
                    m.stack.push(match line {
                        "01" | "00" => Value::Bool,
                        _ => Value::Int(line.parse().map_err(|_| format!("bad INT {line:?}"))?),
                    });
                }
                b'J' => m
                    .stack
                    .push(Value::Int(i32::from_le_bytes(r.array()?).into())),
                b'K' => m.stack.push(Value::Int(r.u8()?.into())),
                b'M' => m
                    .stack
                    .push(Value::Int(u16::from_le_bytes(r.array()?).into())),
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        r.u8()?.into()
                    } else {
                        r.len(4)?
                    };
                    let digits = r.take(n)?;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes at byte {at}"));
                    }
                    // Little-endian two's complement, sign-extended.
                    let fill = if digits.last().is_some_and(|&b| b & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut a = [fill; 8];
                    a[..n].copy_from_slice(digits);
                    m.stack.push(Value::Int(i64::from_le_bytes(a)));
                }
                b'G' => {
                    r.take(8)?;
                    m.stack.push(Value::Float);
                }
                b'F' => {
                    let line = r.line()?;
                    line.parse::<f64>()
                        .map_err(|_| format!("bad FLOAT {line:?}"))?;
                    m.stack.push(Value::Float);
                }
                b'X' | b'T' => m.stack.push(r.str(4)?),
                0x8c | b'U' => m.stack.push(r.str(1)?),
                0x8d => m.stack.push(r.str(8)?),
                b'B' | b'C' | 0x8e => {
                    let n = r.len(match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    })?;
                    r.take(n)?;
                    m.stack.push(Value::Bytes);
                }
                b')' => m.stack.push(Value::Tuple(Rc::from([]), 1)),
                b't' => {
                    let items = m.pop_mark()?;
                    m.stack.push(tuple(items)?);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = (0..n).map(|_| m.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    m.stack.push(tuple(items)?);
                }
                b']' => {
                    let v = m.new_list(Vec::new());
                    m.stack.push(v);
                }
                b'l' => {
                    let items = m.pop_mark()?;
                    let v = m.new_list(items);
                    m.stack.push(v);
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![m.pop()?]
                    } else {
                        m.pop_mark()?
                    };
                    match m.stack.last() {
                        Some(Value::List(l)) => m.lists[*l].extend(items),
                        _ => return Err(format!("APPEND to a non-list at byte {at}")),
                    }
                }
                b'}' => {
                    let v = m.new_dict(Vec::new());
                    m.stack.push(v);
                }
                b'd' | b's' | b'u' => {
                    let items = match op {
                        b's' => {
                            let v = m.pop()?;
                            vec![m.pop()?, v]
                        }
                        _ => m.pop_mark()?,
                    };
                    if items.len() % 2 != 0 {
                        return Err(format!("an odd number of dict items at byte {at}"));
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut items = items.into_iter();
                    while let (Some(k), Some(v)) = (items.next(), items.next()) {
                        pairs.push((k, v));
                    }
                    if op == b'd' {
                        let v = m.new_dict(pairs);
                        m.stack.push(v);
                    } else {
                        match m.stack.last() {
                            Some(Value::Dict(d)) => m.dicts[*d].extend(pairs),
                            // Items set on an object this reader does not model are dropped.
                            Some(Value::Opaque(..)) => {}
                            _ => return Err(format!("SETITEM on a non-dict at byte {at}")),
                        }
                    }
                }
                b'c' => {
                    let module = r.line()?;
                    let name = r.line()?;
                    m.stack.push(Self::global_value(module, name));
                }
                0x93 => {
                    let name = m.pop()?;
                    let module = m.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            m.stack.push(Self::global_value(&module, &name))
                        }
                        _ => return Err(format!("STACK_GLOBAL without two strings at byte {at}")),
                    }
                }
                b'R' | 0x81 | 0x92 => {
                    if op == 0x92 {
                        m.pop()?; // NEWOBJ_EX's keyword arguments
                    }
                    let args = m.pop()?;
                    let callable = m.pop()?;
                    let value = m
                        .call(callable, args)
                        .map_err(|e| format!("{e} (byte {at})"))?;
                    m.stack.push(value);
                }
                b'b' => {
                    // BUILD sets an object's state: nothing a tensor's bytes depend on.
                    m.pop()?;
                    if m.stack.is_empty() {
                        return Err(format!("BUILD on an empty stack at byte {at}"));
                    }
                }
                b'Q' => {
                    let pid = m.pop()?;
                    m.stack
                        .push(Self::persistent(pid).map_err(|e| format!("{e} (byte {at})"))?);
                }
                b'p' | b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'p' => r.line()?.parse().map_err(|_| "bad PUT index")?,
                        b'q' => r.u8()?.into(),
                        b'r' => u32::from_le_bytes(r.array()?),
                        _ => u32::try_from(m.memo.len()).map_err(|_| "memo overflow")?,
                    };
                    let top = m.stack.last().cloned().ok_or("PUT on an empty stack")?;
                    m.memo.insert(key, top);
                }
                b'g' | b'h' | b'j' => {
                    let key: u32 = match op {
                        b'g' => r.line()?.parse().map_err(|_| "bad GET index")?,
                        b'h' => r.u8()?.into(),
                        _ => u32::from_le_bytes(r.array()?),
                    };
                    let v = m
                        .memo
                        .get(&key)
                        .cloned()
                        .ok_or_else(|| format!("GET of unset memo entry {key} at byte {at}"))?;
                    m.stack.push(v);
                }
                0x8f => m.stack.push(Value::Opaque("set".into(), Made::Named)),
                0x90 => {
                    m.pop_mark()?; // ADDITEMS to a set: nothing a tensor depends on
                    if m.stack.is_empty() {
                        return Err(format!("ADDITEMS on an empty stack at byte {at}"));
                    }
                }
                0x91 => {
                    m.pop_mark()?;
                    m.stack.push(Value::Opaque("frozenset".into(), Made::Named));
                }
                0x96 => {
                    let n = r.len(8)?;
                    r.take(n)?;
                    m.stack.push(Value::Bytes);
                }
                other => {
                    return Err(format!(
                        "pickle opcode {other:#04x} at byte {at} is not one a state dict uses"
                    ))
                }
            }
        }
    }

    fn global_value(module: &str, name: &str) -> Value {
        match global(module, name) {
            Some(g) => Value::Global(g),
            None => {
                let mut name = format!("{module}.{name}");
                if name.len() > MAX_NAME {
                    let cut = (0..=MAX_NAME).rev().find(|&i| name.is_char_boundary(i));
                    name.truncate(cut.unwrap_or(0));
                    name.push_str("...");
                }
                Value::Opaque(name.into(), Made::Named)
            }
        }
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("a pop across a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "a pop from an empty stack".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.stack.split_off(at))
    }

    fn new_list(&mut self, items: Vec<Value>) -> Value {
        self.lists.push(items);
        Value::List(self.lists.len() - 1)
    }

    fn new_dict(&mut self, items: Vec<(Value, Value)>) -> Value {
        self.dicts.push(items);
        Value::Dict(self.dicts.len() - 1)
    }

    fn persistent(pid: Value) -> Result<Value, String> {
        let Value::Tuple(t, _) = &pid else {
            return Err(format!(
                "a persistent id that is {}, not a tuple",
                pid.kind()
            ));
        };
        match &t[..] {
            [Value::Str(tag), ty, key, _location, numel] if &**tag == "storage" => {
                let dtype = match ty {
                    Value::Global(Global::StorageType(d)) => *d,
                    // Complex or quantized, say: an error only if such a tensor is read.
                    Value::Opaque(ty, _) => return Ok(Value::Opaque(ty.clone(), Made::Storage)),
                    other => return Err(format!("a storage type that is {}", other.kind())),
                };
                let key: Rc<str> = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string().into(),
                    other => return Err(format!("a storage key that is {}", other.kind())),
                };
                Ok(Value::Storage(Rc::new(Storage {
                    dtype,
                    key,
                    numel: numel.usize("a storage's size")?,
                })))
            }
            _ => Err("a persistent id that is not ('storage', type, key, location, size)".into()),
        }
    }

    fn call(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let g = match callable {
            Value::Global(g) => g,
            // Calling what is not interpreted gives an object that is not either.
            Value::Opaque(name, _) => return Ok(Value::Opaque(name, Made::Called)),
            other => return Err(format!("a call of {}", other.kind())),
        };
        let Value::Tuple(args, _) = args else {
            return Err(format!("arguments that are {}, not a tuple", args.kind()));
        };
        match (g, &args[..]) {
            (Global::OrderedDict, []) => Ok(self.new_dict(Vec::new())),
            (Global::Size, [dims]) => {
                dims.dims("a torch.Size")?;
                Ok(dims.clone())
            }
            (
                Global::RebuildTensor | Global::RebuildTensorV2,
                [storage, offset, size, stride, ..],
            ) => {
                let storage = match storage {
                    Value::Storage(s) => s,
                    Value::Opaque(..) => return Ok(storage.clone()),
                    other => return Err(format!("a tensor rebuilt from {}", other.kind())),
                };
                let shape = size.dims("a tensor's size")?;
                let stride = stride.dims("a tensor's stride")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "a tensor of size {shape:?} with strides {stride:?}"
                    ));
                }
                Ok(Value::Tensor(Rc::new(Tensor {
                    storage: storage.clone(),
                    offset: offset.usize("a tensor's storage offset")?,
                    shape,
                    stride,
                })))
            }
            (Global::RebuildParameter | Global::RebuildParameterWithState, [data, ..]) => {
                match data {
                    Value::Tensor(_) | Value::Opaque(..) => Ok(data.clone()),
                    other => Err(format!("a parameter rebuilt from {}", other.kind())),
                }
            }
            // Not recursive, so that a file cannot nest calls as deep as its size.
            (Global::RebuildFromTypeV2, [Value::Global(Global::RebuildFromTypeV2), ..]) => {
                Err("_rebuild_from_type_v2 of itself".into())
            }
            (Global::RebuildFromTypeV2, [func, _ty, args, _state]) => {
                self.call(func.clone(), args.clone())
            }
            (g, args) => Err(format!("a call of {g:?} with {} arguments", args.len())),
        }
    }

    /// The tensors and uninterpreted objects in `value` under `name`: a dict's items
    /// named by their keys, a list's or tuple's by their positions, joined with `.`
    /// (`{"model": {"fc.weight": t}}` gives `model.fc.weight`, `{"layers": [t]}`
    /// `layers.0`). Of a dict's items under the same key, the last counts, as in
    /// Python; a string and an int key that read the same are both kept (the caller
    /// finds them ambiguous). A container may be reached by several names, but each
    /// item and each byte of a name costs one unit of `budget`, so that containers
    /// shared at every level cannot make the names exponentially many or long.
    fn flatten(
        &self,
        value: &Value,
        name: String,
        depth: usize,
        budget: &mut usize,
        out: &mut Vec<(String, Value)>,
    ) -> Result<(), String> {
        let items: Vec<(String, &Value)> = match value {
            Value::Dict(d) => {
                let mut items = BTreeMap::new();
                for (k, v) in &self.dicts[*d] {
                    let key = match k {
                        Value::Str(s) => (s.to_string(), false),
                        Value::Int(i) => (i.to_string(), true),
                        // Keys of other kinds cannot name a parameter.
                        _ => continue,
                    };
                    items.insert(key, v);
                }
                items.into_iter().map(|((k, _), v)| (k, v)).collect()
            }
            Value::List(l) => self.lists[*l]
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            Value::Tuple(t, _) => t
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            Value::Tensor(_) | Value::Opaque(..) => {
                charge(budget, name.len())?;
                out.push((name, value.clone()));
                return Ok(());
            }
            _ => return Ok(()),
        };
        if depth >= MAX_DEPTH {
            return Err(format!(
                "containers nested deeper than {MAX_DEPTH} (at `{name}`)"
            ));
        }
        charge(budget, items.len())?;
        for (key, v) in items {
            let child = if depth == 0 {
                key
            } else {
                format!("{name}.{key}")
            };
            charge(budget, child.len())?;
            self.flatten(v, child, depth + 1, budget, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaves of the dict a pickle makes: tensors as their shape, what is not
    /// interpreted as its description.
    fn leaves(pickle: &[u8]) -> Result<Vec<(String, String)>, String> {
        let (root, m) = Machine::run(pickle)?;
        let Value::Dict(d) = root else {
            return Err(format!("a root of {}", root.kind()));
        };
        let mut out = Vec::new();
        let mut budget = 16 * pickle.len() + (1 << 20);
        m.flatten(&Value::Dict(d), String::new(), 0, &mut budget, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(name, v)| {
                let v = match v {
                    Value::Tensor(t) => format!("{:?} at {}", t.shape, t.offset),
                    Value::Opaque(name, made) => describe(&name, made),
                    other => other.kind().to_string(),
                };
                (name, v)
            })
            .collect())
    }

    fn text(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    /// `{key: value}`, `value` the opcodes that push it.
    fn dict_of(key: &str, value: &[u8]) -> Vec<u8> {
        [&b"}("[..], &text(key), value, b"u."].concat()
    }

    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    /// `{name: tensor of `shape` viewing a FloatStorage of 6 elements}`, as torch.save
    /// writes it with protocol 2.
    fn state_dict(name: &str, offset: u8, shape: [u8; 2], stride: [u8; 2]) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00(".to_vec();
        p.extend(text(name));
        p.extend(global("torch._utils", "_rebuild_tensor_v2"));
        p.extend(b"(("); // the arguments, and the persistent id within them
        p.extend(text("storage"));
        p.extend(global("torch", "FloatStorage"));
        p.extend(text("0"));
        p.extend(text("cpu"));
        p.extend([b'K', 6, b't', b'Q', b'K', offset]);
        p.extend([
            b'K', shape[0], b'K', shape[1], 0x86, b'K', stride[0], b'K', stride[1], 0x86,
        ]);
        p.push(0x89);
        p.extend(global("collections", "OrderedDict"));
        p.extend(b")Rt");
        p.extend(b"Ru.");
        p
    }

    #[test]
    fn a_state_dict_pickle_gives_its_tensors() {
        let got = leaves(&state_dict("w", 0, [2, 3], [3, 1])).unwrap();
        assert_eq!(got, [("w".to_string(), "[2, 3] at 0".to_string())]);
        let got = leaves(&state_dict("w", 2, [1, 4], [7, 1])).unwrap();
        assert_eq!(got, [("w".to_string(), "[1, 4] at 2".to_string())]);
    }

    #[test]
    fn a_dict_that_holds_itself_is_an_error() {
        let mut p = b"}q\x00".to_vec();
        p.extend(text("a"));
        p.extend(b"h\x00s.");
        let e = leaves(&p).unwrap_err();
        assert!(e.contains("nested deeper than 32"), "{e}");
    }

    /// Globals are never executed; calling one, however often, gives an inert object
    /// whose description does not grow.
    #[test]
    fn globals_are_inert_and_their_calls_stay_small() {
        let mut value = global("os", "system");
        for _ in 0..10_000 {
            value.extend(b")R");
        }
        let got = leaves(&dict_of("x", &value)).unwrap();
        assert_eq!(got, [("x".to_string(), "os.system(...)".to_string())]);
    }

    /// What would take time or stack exponential in, or as deep as, the file's size
    /// is refused: tuples nested 100,000 deep, dicts that hold one dict twice at each
    /// of 30 levels (2^30 names), a type rebuilt through itself.
    #[test]
    fn pickles_that_nest_without_bound_are_errors() {
        let mut deep = b")".to_vec();
        deep.extend([0x85; 100_000]);
        deep.push(b'.');
        let e = Machine::run(&deep).err().unwrap();
        assert!(e.contains("tuples nested deeper than 32"), "{e}");

        let mut shared = b"}q\x00".to_vec();
        for level in 1..30u8 {
            shared.extend([b'}', b'q', level, b'(']);
            for key in ["a", "b"] {
                shared.extend(text(key));
                shared.extend([b'h', level - 1]);
            }
            shared.push(b'u');
        }
        shared.push(b'.');
        let e = leaves(&shared).unwrap_err();
        assert!(e.contains("shared under more names"), "{e}");

        // _rebuild_from_type_v2(_rebuild_from_type_v2, None, (), None)
        let f = global("torch._tensor", "_rebuild_from_type_v2");
        let value = [&f[..], b"(", &f, b"N)NtR"].concat();
        let e = leaves(&dict_of("x", &value)).unwrap_err();
        assert!(e.contains("_rebuild_from_type_v2 of itself"), "{e}");
    }

    /// A file may repeat what it holds once (by the memo) but gets no more than
    /// linear memory from it: a 100 kB global name called 2000 times is described in
    /// a few bytes, 2000 names under a 100 kB key exceed the budget, and a size of
    /// 100 dimensions is refused.
    #[test]
    fn what_a_file_repeats_costs_no_more_than_its_size() {
        let long = "m".repeat(100_000);
        let mut calls = global(&long, "f");
        calls.extend(b"q\x01");
        for _ in 0..2000 {
            calls.extend(b"0h\x01)R");
        }
        let got = leaves(&dict_of("x", &calls)).unwrap();
        assert_eq!(got.len(), 1);
        assert!(
            got[0].1.len() <= MAX_NAME + 8 && got[0].1.ends_with("...(...)"),
            "{}",
            got[0].1
        );

        let mut inner = b"}(".to_vec();
        for i in 0..2000u16 {
            inner.push(b'M');
            inner.extend(i.to_le_bytes());
            inner.extend(global("os", "system"));
        }
        inner.push(b'u');
        let e = leaves(&dict_of(&long, &inner)).unwrap_err();
        assert!(e.contains("shared under more names"), "{e}");

        let mut rank = b"}(".to_vec();
        rank.extend(text("x"));
        rank.extend(global("torch", "Size"));
        rank.extend(b"((");
        rank.extend([b'K', 1].repeat(100));
        rank.extend(b"tt");
        rank.extend(b"Ru.");
        let e = leaves(&rank).unwrap_err();
        assert!(e.contains("100 dimensions, more than the 64 read"), "{e}");
    }

    /// What protocols 4 and 5 write for sets, frozensets and bytearrays is read (as
    /// objects nothing depends on), and a POP right after a MARK pops the mark, as
    /// CPython's unpickler does.
    #[test]
    fn sets_and_other_protocol_4_values_are_inert() {
        let mut p = b"}(".to_vec();
        p.extend(text("tags"));
        p.extend(b"\x8f(K\x01K\x02\x90");
        p.extend(text("frozen"));
        p.extend(b"(K\x01\x91");
        p.extend(text("buffer"));
        p.extend(b"\x96\x02\x00\x00\x00\x00\x00\x00\x00ab");
        p.extend(b"(0u.");
        let got = leaves(&p).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["frozen", "tags"]);
    }

    #[test]
    fn malformed_pickles_are_errors() {
        let mut wide = b"\x8a\x09".to_vec();
        wide.extend([1; 9]);
        wide.push(b'.');
        let mut negative = state_dict("w", 0, [2, 3], [3, 1]);
        // The first dimension as BININT -1 instead of BININT1 2.
        let at = negative
            .windows(4)
            .position(|w| w == [b'K', 2, b'K', 3])
            .unwrap();
        negative.splice(at..at + 2, *b"J\xff\xff\xff\xff");
        let mut ranks = state_dict("w", 0, [2, 3], [3, 1]);
        let at = ranks
            .windows(5)
            .position(|w| w == [b'K', 3, b'K', 1, 0x86])
            .unwrap();
        ranks.splice(at..at + 5, [b'K', 1, 0x85]);
        let cases: [(&[u8], &str); 13] = [
            (b"\xff", "opcode 0xff at byte 0"),
            (b"X\xff\xff\xff\x7f", "ends inside an opcode"),
            (b"K\x01", "ends inside an opcode at byte 2"),
            (b"K\x01K\x01(R", "across a MARK"),
            (b".", "empty stack"),
            (b"h\x05", "unset memo entry 5"),
            (&wide, "an integer of 9 bytes"),
            (b"K\x01K\x02a.", "APPEND to a non-list"),
            (b"}K\x01u.", "no MARK"),
            (b"}(K\x01u.", "odd number of dict items"),
            (b"K\x01Q.", "persistent id"),
            (&negative, "a tensor's size -1 is negative"),
            (&ranks, "strides [1]"),
        ];
        for (pickle, words) in cases {
            let e = leaves(pickle).unwrap_err();
            assert!(e.contains(words), "`{e}` does not say `{words}`");
        }
    }
}
