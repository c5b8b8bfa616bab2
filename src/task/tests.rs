//! The registry against a real catalog.

use super::*;

/// With the catalog locked by another writer, the registry still queues, runs,
/// shows and counts tasks from memory; their records land once the lock is gone.
#[test]
fn a_locked_catalog_does_not_block_submit_get_or_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = Tasks::start(dir.path(), 1, TaskRetention::default()).unwrap();
    let blocker = rusqlite::Connection::open(dir.path().join("catalog.sqlite")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t0 = Instant::now();
    let id = tasks
        .submit(
            "backup",
            "d",
            None,
            "test",
            Box::new(|_| Ok(serde_json::json!({"ok": 1}))),
        )
        .unwrap();
    let done = tasks.wait(&id, Duration::from_secs(10)).unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(tasks.counts(), (0, 0));
    // The catalog's busy timeout is 30 s: none of this waited for it.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    blocker.execute_batch("COMMIT").unwrap();
    assert!(tasks.flush(Duration::from_secs(60)));
    let cat = Catalog::open(dir.path()).unwrap();
    let stored: TaskInfo = cat.task(&id).unwrap();
    assert_eq!(stored.state, TaskState::Succeeded);
    assert_eq!(stored.result, Some(serde_json::json!({"ok": 1})));
}

#[test]
fn a_failure_keeps_its_kind_across_the_task_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = Tasks::start(dir.path(), 1, TaskRetention::default()).unwrap();
    let id = tasks
        .submit(
            "backup",
            "d",
            None,
            "test",
            Box::new(|_| Err(Error::new(ErrorKind::Full, "no room"))),
        )
        .unwrap();
    let t = tasks.wait(&id, Duration::from_secs(10)).unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.error_kind, Some(ErrorKind::Full));
    assert!(tasks.flush(Duration::from_secs(10)));
    let v = serde_json::to_value(tasks.get(&id).unwrap()).unwrap();
    assert_eq!(v["error_kind"], "full");
}
