use sqlite_export_store::*;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread")]
async fn smoke() {
    let store = SqliteOutputStore::temporary_with(
        "http://h",
        StoreOptions::default().with_chunk_size(1000),
    )
    .unwrap();
    let key = ExportPartKey::output("t", ExportJobId::new(), "Patient", 0, 1);
    let mut w = store.open_writer(&key).await.unwrap();
    let mut expect = String::new();
    for i in 0..500 {
        let l = format!("{{\"resourceType\":\"Patient\",\"id\":\"{i}\"}}");
        w.write_line(&l).await.unwrap();
        expect.push_str(&l);
        expect.push('\n');
    }
    let f = store.finalize_part(&key, w).await.unwrap();
    assert_eq!(f.size_bytes as usize, expect.len());
    let mut s = String::new();
    store
        .open_reader(&key)
        .await
        .unwrap()
        .read_to_string(&mut s)
        .await
        .unwrap();
    assert_eq!(s, expect);
    let info = store.part_info(&key).await.unwrap();
    println!("{info:?}");
}
