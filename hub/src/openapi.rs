//! `/api/v1/openapi.json`: an OpenAPI 3.0 description of the hub API, written out by hand from
//! the same shapes the handlers use (a derive crate would need annotations on every type of
//! three crates for a document that changes with this file only).

use serde_json::{json, Value};

fn error_responses() -> Value {
    let e = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({"400": e, "401": e, "404": e, "409": e, "503": e})
}

fn op(summary: &str, ok: &str, schema: &str, body: Option<&str>) -> Value {
    let mut responses = error_responses();
    if let Value::Object(m) = &mut responses {
        m.insert(
            ok.to_string(),
            json!({"description": summary, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}),
        );
    }
    let mut o = json!({"summary": summary, "responses": responses, "security": [{"bearer": []}]});
    if let (Some(b), Value::Object(m)) = (body, &mut o) {
        m.insert(
            "requestBody".into(),
            json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}}),
        );
    }
    o
}

/// `op` with the list filters (`vm_name`, `tag`) as query parameters.
fn with_filters(mut o: Value) -> Value {
    if let Value::Object(m) = &mut o {
        m.insert(
            "parameters".into(),
            json!([
                {"name": "vm_name", "in": "query", "required": false, "schema": {"type": "string"}},
                {"name": "tag", "in": "query", "required": false, "schema": {"type": "string"}}
            ]),
        );
    }
    o
}

/// `op` with the delete's `merge` query parameter.
fn with_merge(mut o: Value) -> Value {
    if let Value::Object(m) = &mut o {
        m.insert(
            "parameters".into(),
            json!([{"name": "merge", "in": "query", "required": false, "schema": {"type": "boolean"}}]),
        );
    }
    o
}

/// The request and answer shapes (`components.schemas`).
fn schemas() -> Value {
    json!({
        "Error": {"type": "object", "required": ["error", "code"], "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
        "BackupRequest": {"type": "object", "required": ["vm_name", "backup_type"], "properties": {
            "vm_name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            "backup_type": {"type": "string", "enum": ["full", "incremental"]},
            "node": {"type": "string"}, "repository_id": {"type": "string", "enum": ["default"]},
            "tags": {"type": "array", "maxItems": 16, "items": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}},
            "keep": {"type": "integer", "minimum": 1, "description": "retention once this backup completes: the newest N backups of the VM kept; with keep_hourly..keep_yearly, what no rule keeps is merged away (none given: the hub's config)"},
            "keep_hourly": {"type": "integer", "minimum": 1}, "keep_daily": {"type": "integer", "minimum": 1},
            "keep_weekly": {"type": "integer", "minimum": 1}, "keep_monthly": {"type": "integer", "minimum": 1},
            "keep_yearly": {"type": "integer", "minimum": 1}}},
        "PruneRequest": {"type": "object", "properties": {
            "vm_name": {"type": "string", "description": "none: every VM with backups (answer: PruneAll)"}, "node": {"type": "string"},
            "schedule": {"type": "string", "description": "the backups this [[schedule]] with keep_* of its own made (rules: its own unless given); none: the backups under the hub's rules"},
            "keep": {"type": "integer", "minimum": 1}, "keep_hourly": {"type": "integer", "minimum": 1},
            "keep_daily": {"type": "integer", "minimum": 1}, "keep_weekly": {"type": "integer", "minimum": 1},
            "keep_monthly": {"type": "integer", "minimum": 1}, "keep_yearly": {"type": "integer", "minimum": 1},
            "dry_run": {"type": "boolean", "default": false}}},
        "Prune": {"type": "object", "properties": {
            "vm_name": {"type": "string"}, "node": {"type": "string"}, "dry_run": {"type": "boolean"},
            "schedule": {"type": "string", "description": "the schedule whose backups were pruned (absent: those under the hub's rules)"},
            "policy": {"type": "object", "additionalProperties": {"type": "integer"}},
            "removed": {"type": "integer"}, "failed": {"type": "integer"},
            "backups": {"type": "array", "items": {"type": "object", "properties": {
                "backup_id": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
                "action": {"type": "string", "enum": ["keep", "remove"]}, "schedule": {"type": "string", "description": "the schedule that made it"},
                "kept_by": {"type": "string", "enum": ["keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly", "undated", "other-retention"]},
                "error": {"type": "string"}}}}}},
        "ReplicationRequest": {"type": "object", "required": ["vm_name"], "properties": {"vm_name": {"type": "string"}, "node": {"type": "string"}}},
        "RestoreRequest": {"type": "object", "required": ["backup_id"], "properties": {
            "backup_id": {"type": "string"},
            "destinations": {"type": "object", "additionalProperties": {"type": "string"}, "description": "disk key -> path on the node: the hub has the node write those disks, follows it, closes the exports and checks each disk's checksum against the backup's"},
            "node": {"type": "string", "description": "with destinations: the node to restore onto (default: the backup's)"}}},
        "DiskResult": {"type": "object", "properties": {
            "disk_id": {"type": "integer"}, "disk_key": {"type": "integer"}, "nbd_port": {"type": "integer"},
            "nbd_export_name": {"type": "string"}, "qcow2_path": {"type": "string"}, "status": {"type": "string"},
            "error_message": {"type": "string"}}},
        "DiskProgress": {"type": "object", "properties": {
            "disk_key": {"type": "integer"}, "bytes_total": {"type": "integer"}, "bytes_done": {"type": "integer"},
            "bytes_sent": {"type": "integer"}, "rate_bps": {"type": "integer"}, "eta_s": {"type": "integer"},
            "status": {"type": "string"}, "error": {"type": "string"}}},
        "Backup": {"type": "object", "properties": {
            "backup_id": {"type": "string"}, "replication_id": {"type": "string"}, "vm_name": {"type": "string"},
            "node": {"type": "string"}, "backup_type": {"type": "string", "enum": ["full", "incremental"]},
            "parent_id": {"type": "string", "nullable": true},
            "status": {"type": "string", "enum": ["queued", "running", "verifying", "completed", "failed", "cancelled"]},
            "created_at": {"type": "string", "format": "date-time"}, "completed_at": {"type": "string", "format": "date-time"},
            "nbd_targets_string": {"type": "string"},
            "disk_results": {"type": "array", "items": {"$ref": "#/components/schemas/DiskResult"}},
            "disks": {"type": "array", "items": {"$ref": "#/components/schemas/DiskProgress"}},
            "error": {"type": "string"}, "note": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "schedule": {"type": "string", "description": "the [[schedule]] whose run made it (absent: a request)"},
            "verified": {"type": "object", "description": "the last verification since the backup completed (scrub or request)", "properties": {
                "at": {"type": "string", "format": "date-time"}, "ok": {"type": "boolean"}, "error": {"type": "string"}}},
            "compressed": {"type": "object", "description": "its images rewritten compressed (compress = \"zstd\")", "properties": {
                "at": {"type": "string", "format": "date-time"}, "data_bytes": {"type": "integer"}, "stored_bytes": {"type": "integer"}}}}},
        "BackupList": {"type": "array", "items": {"$ref": "#/components/schemas/Backup"}},
        "Verify": {"type": "object", "properties": {"ok": {"type": "boolean"}, "disks": {"type": "array", "items": {"type": "object", "properties": {
            "disk_key": {"type": "integer"}, "check": {"type": "string"}, "checksum_match": {"type": "boolean", "nullable": true}}}}}},
        "Restore": {"type": "object", "properties": {
            "restore_id": {"type": "string"}, "backup_id": {"type": "string"}, "nbd_targets_string": {"type": "string"},
            "exports": {"type": "array", "items": {"type": "object", "properties": {
                "disk_key": {"type": "integer"}, "nbd_port": {"type": "integer"}, "nbd_export_name": {"type": "string"}}}},
            "node": {"type": "string"}, "status": {"type": "string", "enum": ["running", "completed", "failed", "cancelled"]},
            "error": {"type": "string"},
            "disks": {"type": "array", "items": {"type": "object", "properties": {
                "disk_key": {"type": "integer"}, "destination": {"type": "string"}, "status": {"type": "string"},
                "bytes_total": {"type": "integer"}, "bytes_read": {"type": "integer"}, "rate_bps": {"type": "integer"},
                "eta_s": {"type": "integer"}, "checksum": {"type": "string"}, "checksum_match": {"type": "boolean"},
                "error": {"type": "string"}}}}}},
        "RestoreList": {"type": "array", "items": {"$ref": "#/components/schemas/Restore"}},
        "Ports": {"type": "object", "properties": {"range": {"type": "string"}, "free": {"type": "integer"},
            "leased": {"type": "array", "items": {"type": "object", "properties": {"port": {"type": "integer"}, "job_id": {"type": "string"}}}}}},
        "Exports": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "port": {"type": "integer"}, "connections": {"type": "integer"},
            "bytes_read": {"type": "integer"}, "bytes_written": {"type": "integer"}, "read_only": {"type": "boolean"}}}}
    })
}

/// A schedule and its runs (`GET /api/v1/schedules`).
fn schedule_schema() -> Value {
    let run = json!({"type": "object", "properties": {
        "occurrence": {"type": "string", "format": "date-time"},
        "trigger": {"type": "string", "enum": ["schedule", "catch-up", "api"]},
        "started_at": {"type": "string", "format": "date-time"}, "ended_at": {"type": "string", "format": "date-time"},
        "errors": {"type": "array", "items": {"type": "string"}},
        "backups": {"type": "array", "items": {"type": "object", "properties": {
            "vm_name": {"type": "string"}, "node": {"type": "string"}, "backup_id": {"type": "string"},
            "replication_id": {"type": "string"},
            "status": {"type": "string", "enum": ["waiting", "running", "completed", "failed", "cancelled", "skipped"]},
            "error": {"type": "string"}}}}}});
    json!({"type": "object", "properties": {
        "name": {"type": "string"}, "kind": {"type": "string", "enum": ["backup", "replication"]},
        "vms": {"type": "array", "items": {"type": "string"}}, "exclude": {"type": "array", "items": {"type": "string"}},
        "when": {"type": "string"}, "backup_type": {"type": "string", "enum": ["full", "incremental"]},
        "node": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
        "parallel": {"type": "integer"},
        "retention": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "its keep_* (absent: the hub's)"},
        "next_run": {"type": "string", "format": "date-time"},
        "running": run, "last_run": run, "skipped_occurrences": {"type": "integer"}}})
}

/// A node as the hub sees it (`GET /api/v1/nodes`).
fn node_schema() -> Value {
    let disk = json!({"type": "object", "properties": {
        "key": {"type": "integer"}, "size": {"type": "integer"},
        "source_kind": {"type": "string"}, "format": {"type": "string", "enum": ["raw", "qcow2"]},
        "error": {"type": "string"}}});
    json!({"type": "object", "required": ["name", "url", "reachable", "checked_at", "vms", "running"], "properties": {
        "name": {"type": "string"}, "url": {"type": "string"}, "reachable": {"type": "boolean"},
        "error": {"type": "string"}, "checked_at": {"type": "string", "format": "date-time"},
        "last_seen": {"type": "string", "format": "date-time"},
        "vms": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "disks": {"type": "array", "items": disk}}}},
        "running": {"type": "array", "items": {"type": "string"}},
        "tunnel": {"type": "object", "description": "the node's GET /api/v1/tunnel (one node's view only)"},
        "tunnel_sessions": {"type": "array", "description": "its sessions at the hub's SSH endpoint now, oldest first (absent: no endpoint)",
            "items": {"type": "object", "properties": {"peer": {"type": "string"}, "since": {"type": "string", "format": "date-time"}}}},
        "key_fingerprint": {"type": "string", "description": "the fingerprint of its key (SHA256:..., as ssh-keygen -lf prints it)"},
        "refused_logins": {"type": "array", "description": "logins of its key the hub's SSH endpoint refused in the last hour, latest first (absent: no endpoint)",
            "items": {"$ref": "#/components/schemas/RefusedLogin"}}}})
}

/// A login the hub's SSH endpoint refused (`GET /api/v1/ssh`).
fn refused_login_schema() -> Value {
    json!({"type": "object", "required": ["reason", "peer", "count", "first", "last"], "properties": {
        "reason": {"type": "string", "enum": ["unknown-key", "key-expired", "address-not-allowed", "too-many-connections", "wrong-user", "ended-before-login"]},
        "fingerprint": {"type": "string", "description": "the key's (SHA256:...); absent: none offered (ended-before-login)"},
        "node": {"type": "string", "description": "the node whose key it is (absent: a key the hub does not know)"},
        "peer": {"type": "string", "description": "the address the logins came from"},
        "count": {"type": "integer"},
        "first": {"type": "string", "format": "date-time"}, "last": {"type": "string", "format": "date-time"}}})
}

/// The document.
pub fn document() -> Value {
    let name = json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut schemas = schemas();
    if let Value::Object(m) = &mut schemas {
        m.insert("Schedule".into(), schedule_schema());
        m.insert(
            "PruneAll".into(),
            json!({"type": "object", "properties": {
                "dry_run": {"type": "boolean"}, "schedule": {"type": "string"},
                "policy": {"type": "object", "additionalProperties": {"type": "integer"}},
                "removed": {"type": "integer"}, "failed": {"type": "integer"},
                "vms": {"type": "array", "items": {"$ref": "#/components/schemas/Prune"}}}}),
        );
        m.insert("ScheduleList".into(), json!({"type": "array", "items": {"$ref": "#/components/schemas/Schedule"}}));
        m.insert("Node".into(), node_schema());
        m.insert(
            "VmList".into(),
            json!({"type": "array", "items": {"type": "object", "required": ["vm_name", "node", "listed", "disks", "backups"], "properties": {
                "vm_name": {"type": "string"}, "node": {"type": "string"},
                "listed": {"type": "boolean", "description": "its node listed it at this call's check"},
                "disks": {"type": "array", "items": {"type": "object", "properties": {"key": {"type": "integer"}, "size": {"type": "integer"}}}},
                "backups": {"type": "integer"},
                "newest_backup": {"type": "object", "properties": {
                    "backup_id": {"type": "string"}, "backup_type": {"type": "string", "enum": ["full", "incremental"]},
                    "completed_at": {"type": "string", "format": "date-time"}}},
                "running": {"type": "string", "description": "the id of a backup or replication of it running now"},
                "backup_schedules": {"type": "array", "items": {"type": "string"}, "description": "the backup schedules whose runs back it up (empty: none does)"},
                "excluded_by": {"type": "array", "items": {"type": "string"}, "description": "backup schedules of \"*\" whose exclude leaves it out on purpose"}}}}),
        );
        m.insert("NodeList".into(), json!({"type": "array", "items": {"$ref": "#/components/schemas/Node"}}));
        m.insert("RefusedLogin".into(), refused_login_schema());
        m.insert(
            "RefusedLoginList".into(),
            json!({"type": "array", "items": {"$ref": "#/components/schemas/RefusedLogin"}}),
        );
    }
    let id = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    json!({
        "openapi": "3.0.3",
        "info": {"title": "sendense-hub", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas
        },
        "paths": {
            "/api/v1/backups": {
                "post": op("start a backup of a VM (all disks, one snapshot)", "202", "Backup", Some("BackupRequest")),
                "get": with_filters(op("backups, newest first (?vm_name=, ?tag=)", "200", "BackupList", None))
            },
            "/api/v1/backups/{id}": {
                "parameters": id,
                "get": op("one backup with per-disk progress", "200", "Backup", None),
                "delete": with_merge(op(
                    "cancel a running backup or delete a finished one (?merge=true: one an incremental builds on, by merging that incremental into it)",
                    "200",
                    "Backup",
                    None
                ))
            },
            "/api/v1/backups/{id}/verify": {"parameters": id, "post": op("check images and checksums", "200", "Verify", None)},
            "/api/v1/restores": {
                "post": op("open read-only exports of a backup", "201", "Restore", Some("RestoreRequest")),
                "get": op("open restores", "200", "RestoreList", None)
            },
            "/api/v1/restores/{id}": {
                "parameters": id,
                "get": op("one restore: open, or one the hub drove onto a node, with its progress and outcome", "200", "Restore", None),
                "delete": op("close a restore (one the hub drives is cancelled on its node first)", "200", "Restore", None)
            },
            "/api/v1/replications": {
                "post": op("run the VM's replica up to date", "202", "Backup", Some("ReplicationRequest")),
                "get": with_filters(op("replication runs (?vm_name=)", "200", "BackupList", None))
            },
            "/api/v1/replications/{id}": {
                "parameters": id,
                "get": op("one replication run", "200", "Backup", None),
                "delete": op("cancel a running replication run (its replica is made anew next time) or forget a finished one", "200", "Backup", None)
            },
            "/api/v1/prune": {"post": op("apply retention rules to a VM's backups now, or without vm_name to every VM's (then the answer is PruneAll); dry_run: only say what they would remove", "200", "Prune", Some("PruneRequest"))},
            "/api/v1/schedules": {"get": op("backup schedules ([[schedule]]): next occurrence, the run under way, the last run", "200", "ScheduleList", None)},
            "/api/v1/schedules/{name}": {"parameters": name, "get": op("one schedule", "200", "Schedule", None)},
            "/api/v1/schedules/{name}/run": {"parameters": name, "post": op("run the schedule now, in the background (409 while a run of it goes on)", "202", "Schedule", None)},
            "/api/v1/vms": {"get": op("every VM a node lists (checked now) or with backups: its disks, backups, the newest, a run of it under way", "200", "VmList", None)},
            "/api/v1/nodes": {"get": op("the nodes ([[node]]), each checked now: reachable or why not, VMs, what runs on it", "200", "NodeList", None)},
            "/api/v1/nodes/{name}": {"parameters": name, "get": op("one node, checked now, with its tunnel as it reports it", "200", "Node", None)},
            "/api/v1/ssh": {"get": op("the hub's SSH endpoint: its host key's fingerprint, the sessions logged in, the logins refused in the last hour by reason, key and address (404: no endpoint)", "200", "Ssh", None)},
            "/api/v1/ports": {"get": op("NBD port leases", "200", "Ports", None)},
            "/api/v1/exports": {"get": op("open exports with counters", "200", "Exports", None)},
            "/healthz": {"get": {"summary": "liveness (no token)", "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus text", "responses": {"200": {"description": "metrics"}}, "security": [{"bearer": []}]}}
        }
    })
}
