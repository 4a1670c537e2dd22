//! Reading and writing Hugging Face safetensors weights: single files, sharded checkpoints with
//! `model.safetensors.index.json`, and dtype conversion to the compute dtype.
//!
//! Every failure names the file and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use super::error::{ModelError, Result};
use crate::fsio;

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of one checkpoint, each remembered with the file it came from.
pub struct TensorSet {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// Where the tensors were read from (a file or a directory), for error messages.
    pub source: PathBuf,
}

impl TensorSet {
    /// An empty set; `source` names it in errors.
    pub fn empty(source: PathBuf) -> Self {
        Self {
            tensors: HashMap::new(),
            source,
        }
    }

    /// A set of in-memory tensors (e.g. freshly initialized weights); `source` names it in errors.
    pub fn from_tensors(source: PathBuf, tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut set = Self::empty(source.clone());
        for (name, tensor) in tensors {
            set.insert(name, tensor, source.clone())?;
        }
        Ok(set)
    }

    /// Whether a tensor of this name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A tensor, without removing it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    /// Removes and returns a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (tensor, file) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::tensor(&self.source, name, "missing"))?;
        if tensor.dims() != shape {
            return Err(ModelError::tensor(
                file,
                name,
                format!("has shape {:?}, expected {:?}", tensor.dims(), shape),
            ));
        }
        Ok(tensor)
    }

    /// Removes and returns a tensor if present, checking its shape.
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Removes and returns every tensor left, with its file.
    pub fn drain(&mut self) -> Vec<(String, Tensor, PathBuf)> {
        let mut rest: Vec<_> = self.tensors.drain().map(|(n, (t, f))| (n, t, f)).collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        rest
    }

    fn insert(&mut self, name: String, tensor: Tensor, file: PathBuf) -> Result<()> {
        if let Some((_, first)) = self.tensors.get(&name) {
            return Err(ModelError::tensor(
                &file,
                &name,
                format!("also present in {}", first.display()),
            ));
        }
        self.tensors.insert(name, (tensor, file));
        Ok(())
    }
}

/// Loads the weights of a model directory: `model.safetensors.index.json` with its shards if
/// present, else `model.safetensors`. Floating-point tensors are converted to `dtype`.
pub fn load_model_weights(dir: &Path, dtype: DType, device: &Device) -> Result<TensorSet> {
    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    if index.is_file() {
        load_sharded(&index, dtype, device)
    } else if single.is_file() {
        let mut set = TensorSet::empty(single.clone());
        load_file_into(&single, dtype, device, &mut set)?;
        Ok(set)
    } else {
        Err(ModelError::file(
            dir,
            format!("no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory"),
        ))
    }
}

fn load_sharded(index: &Path, dtype: DType, device: &Device) -> Result<TensorSet> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::file(index, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(index, format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::key(index, "weight_map", "missing or not an object"))?;
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::key(
                index,
                format!("weight_map.{tensor}"),
                "expected a file name",
            )
        })?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelError::key(
                index,
                format!("weight_map.{tensor}"),
                format!("`{file}` is not a file of this directory"),
            ));
        }
        expected
            .entry(file.to_string())
            .or_default()
            .push(tensor.clone());
    }
    let mut set = TensorSet::empty(dir.to_path_buf());
    for (file, names) in &expected {
        let path = dir.join(file);
        load_file_into(&path, dtype, device, &mut set)?;
        for name in names {
            match set.tensors.get(name) {
                Some((_, from)) if from == &path => {}
                _ => {
                    return Err(ModelError::tensor(
                        &path,
                        name,
                        format!("listed in {INDEX_FILE} for this file but not found in it"),
                    ))
                }
            }
        }
    }
    Ok(set)
}

/// Loads every tensor of one safetensors file, converting floating-point tensors to `dtype`.
pub fn load_file(path: &Path, dtype: DType, device: &Device) -> Result<TensorSet> {
    let mut set = TensorSet::empty(path.to_path_buf());
    load_file_into(path, dtype, device, &mut set)?;
    Ok(set)
}

fn load_file_into(path: &Path, dtype: DType, device: &Device, set: &mut TensorSet) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns; every tensor is
    // copied out of it. A file truncated by another process while mapped is outside what axl
    // guards against, as in every safetensors reader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::file(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ModelError::file(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        let tensor =
            view_to_tensor(&view, dtype, device).map_err(|m| ModelError::tensor(path, &name, m))?;
        set.insert(name, tensor, path.to_path_buf())?;
    }
    Ok(())
}

fn view_to_tensor(
    view: &TensorView,
    dtype: DType,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let source = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        other => return Err(format!("dtype {other:?} is not supported")),
    };
    let tensor = Tensor::from_raw_buffer(view.data(), source, view.shape(), device)
        .map_err(|e| e.to_string())?;
    if source.is_float() && source != dtype {
        tensor.to_dtype(dtype).map_err(|e| e.to_string())
    } else {
        Ok(tensor)
    }
}

/// The safetensors dtype a tensor is saved as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
}

impl SaveDtype {
    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

fn tensor_bytes(tensor: &Tensor, dtype: SaveDtype) -> candle_core::Result<(StDtype, Vec<u8>)> {
    let flat = tensor.to_dtype(dtype.candle())?.flatten_all()?;
    Ok(match dtype {
        SaveDtype::F32 => (
            StDtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        SaveDtype::BF16 => (
            StDtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        SaveDtype::F16 => (
            StDtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    })
}

/// Serializes named tensors to safetensors bytes with `{"format": "pt"}` metadata, as
/// transformers and peft write them.
pub fn serialize(tensors: &[(String, Tensor)], dtype: SaveDtype) -> Result<Vec<u8>> {
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let (st_dtype, bytes) = tensor_bytes(tensor, dtype)?;
        encoded.push((name.clone(), st_dtype, tensor.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(name, st_dtype, shape, bytes)| {
            TensorView::new(*st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::tensor("<memory>", name, e))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| ModelError::Invalid(e.to_string()))
}

/// Writes one safetensors file atomically.
pub fn save_file(path: &Path, tensors: &[(String, Tensor)], dtype: SaveDtype) -> Result<()> {
    let bytes = serialize(tensors, dtype)?;
    fsio::write_atomic(path, &bytes).map_err(|e| ModelError::file(path, e))
}

/// Writes model weights into `dir` the way transformers does: `model.safetensors` when they fit
/// in `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards and an index.
/// Each file is written atomically; the index is written last, so a reader never sees an index
/// naming a shard that is not complete. Files of an earlier save that this one does not
/// produce are removed after the new ones are in place.
pub fn save_model_weights(
    dir: &Path,
    tensors: &[(String, Tensor)],
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let element = dtype.candle().size_in_bytes();
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![vec![]];
    let mut current = 0usize;
    let mut total = 0usize;
    for entry in tensors {
        let size = entry.1.elem_count() * element;
        if current > 0 && current + size > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("one shard at least").push(entry);
        current += size;
        total += size;
    }
    let mut written = vec![];
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        save_file(&path, tensors, dtype)?;
        written.push(path);
    } else {
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
            let owned: Vec<(String, Tensor)> =
                shard.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
            let path = dir.join(&name);
            save_file(&path, &owned, dtype)?;
            for (n, _) in &owned {
                weight_map.insert(n.clone(), Value::String(name.clone()));
            }
            written.push(path);
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        fsio::write_json_atomic(&path, &index).map_err(|e| ModelError::file(&path, e))?;
        written.push(path);
    }
    remove_stale_weight_files(dir, &written)?;
    Ok(written)
}

fn remove_stale_weight_files(dir: &Path, keep: &[PathBuf]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::file(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let is_weights = name == SINGLE_FILE
            || name == INDEX_FILE
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if is_weights && !keep.contains(&path) {
            std::fs::remove_file(&path).map_err(|e| ModelError::file(&path, e))?;
        }
    }
    Ok(())
}
