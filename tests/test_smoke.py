def test_trained_fixture_records_steps(trained):
    store, name = trained
    assert store.lineage(name)["steps"] == 20
