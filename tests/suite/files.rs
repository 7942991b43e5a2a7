//! Reading the repository's own files (manifests, schemas, documentation)
//! in tests, and reporting JSON Schema violations one line each.

use std::path::{Path, PathBuf};

use jsonschema::Validator;
use serde_json::Value;

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A repository file's text; panics naming the file.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// A repository JSON file; panics naming the file.
pub fn load_json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid JSON: {e}"))
}

/// Every violation, one line each (empty when valid).
pub fn violations(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("at {:?}: {e}", e.instance_path.to_string()))
        .collect()
}
