//! Writes `schemas/plan.schema.json` from the types: `cargo run -p schemas --example write_schema`.
//! The test `committed_schema_is_current` fails when the committed file is stale.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plan.schema.json");
    let text = serde_json::to_string_pretty(&schemas::json_schema())? + "\n";
    schemas::io::write_atomic(&path, text.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}
