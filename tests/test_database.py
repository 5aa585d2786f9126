"""The gene database (database/*, expkit.database) checked on the real Ensembl 98 tables and DLPFC."""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from expkit import database as db
from expkit.errors import InputError, KeyNotFoundError

ROOT = Path(__file__).resolve().parents[1]
TP53, TRP53 = "ENSG00000141510", "ENSMUSG00000059552"


@pytest.fixture(scope="module")
def hsa() -> pd.DataFrame:
    return db.genes("hsa")


@pytest.fixture(scope="module")
def mmu() -> pd.DataFrame:
    return db.genes("mmu")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    from expkit._logging import logger

    handler = _Lines()
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def _dlpfc(shared: Path, sample: str) -> ad.AnnData:
    import h5py

    path = shared / "dlpfc" / sample / "filtered_feature_bc_matrix_top5000genes.h5"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with h5py.File(path, "r") as f:
        ids = f["matrix/features/id"][:].astype(str)
        names = f["matrix/features/name"][:].astype(str)
    adata = ad.AnnData(X=sp.csr_matrix((2, len(ids)), dtype=np.float32),
                       var=pd.DataFrame({"gene_ids": ids, "name": names}, index=names))
    adata.var_names_make_unique()
    return adata


# ----------------------------------------------------------------------------- tables
def test_tables_shape_and_fields(hsa, mmu):
    cols = ["ensembl", "gene", "chromosome", "start", "end", "strand", "biotype", "assembly",
            "description", "mito", "ribo"]
    for g, n, asm in ((hsa, 60623, "GRCh38"), (mmu, 55421, "GRCm38")):
        assert list(g.columns) == cols
        assert g.index.name == "uid" and g.index.is_unique and len(g) == n
        assert (g.index == g["ensembl"]).all()
        assert (g["assembly"] == asm).all()
        assert (g["start"] <= g["end"]).all() and set(g["strand"]) == {1, -1}
        assert not g["chromosome"].str.startswith("CHR_").any()
    assert hsa.index.str.match(r"^ENSG\d{11}$").all()
    assert mmu.index.str.match(r"^ENSMUSG\d{11}$").all()


def test_tp53_coordinates(hsa, mmu):
    row = hsa.loc[TP53]
    assert (row["gene"], row["chromosome"], row["start"], row["end"], row["strand"], row["biotype"]) == \
        ("TP53", "17", 7661779, 7687550, -1, "protein_coding")
    row = mmu.loc[TRP53]
    assert (row["gene"], row["chromosome"], row["start"], row["end"], row["strand"]) == \
        ("Trp53", "11", 69580359, 69591873, 1)


def test_mito_genes(hsa, mmu):
    assert hsa["mito"].sum() == 37 and mmu["mito"].sum() == 37
    assert hsa.loc[hsa["mito"], "gene"].str.startswith("MT-").all()
    assert mmu.loc[mmu["mito"], "gene"].str.startswith("mt-").all()
    assert hsa.loc[db.lookup("MT-CO1", "hsa")[0], "mito"]


def test_ribo_flags(hsa, mmu):
    sym = hsa.reset_index().drop_duplicates("gene").set_index("gene")
    for gene in ("RPL3", "RPS6", "MRPL1", "MRPS7", "RPLP0", "RPSA", "RPS4Y1", "FAU", "UBA52"):
        assert sym.loc[gene, "ribo"], gene
    for gene in ("RPS6KA1", "RPS6KB1", "RPS19BP1", "RPL3P2", "RPL21P28", "RPL17-C18orf32", "GAPDH"):
        assert not sym.loc[gene, "ribo"], gene
    ribo = hsa[hsa["ribo"]]
    assert (ribo["biotype"] == "protein_coding").all()
    mito_rp = ribo["description"].str.contains("mitochondrial")
    assert 78 <= mito_rp.sum() <= 82          # MRPL/MRPS
    assert 80 <= (~mito_rp).sum() <= 90       # RPL/RPS + FAU, UBA52 and a few paralogs
    assert not ribo["gene"].str.contains("K").any()  # no kinase
    msym = mmu.reset_index().drop_duplicates("gene").set_index("gene")
    for gene in ("Rpl3", "Rps6", "Mrpl1", "Mrps7", "Fau", "Rps3a1"):
        assert msym.loc[gene, "ribo"], gene
    assert not msym.loc["Rps6ka1", "ribo"] and not msym.loc["Rpl9-ps1", "ribo"]
    assert 155 <= mmu["ribo"].sum() <= 175


# ----------------------------------------------------------------------------- lookup
def test_lookup_forms():
    names = ["TP53", TP53, TP53 + ".16", "ENSG00000141510.16_PAR_Y", "Tp53", "p53", "LFS1",
             "C10orf2", "MLL", "HER2", "AARS1", "GAPDH", "nonsense", "", None, TRP53, "Trp53"]
    got = db.lookup(names, "hsa")
    assert got.dtype == object and len(got) == len(names)
    assert list(got[:7]) == [TP53] * 7
    assert got[7] == db.lookup("TWNK", "hsa")[0] == "ENSG00000107815"       # previous symbol
    assert got[8] == db.lookup("KMT2A", "hsa")[0] == "ENSG00000118058"      # previous symbol
    assert got[9] == db.lookup("ERBB2", "hsa")[0] == "ENSG00000141736"      # alias
    assert got[10] == db.lookup("AARS", "hsa")[0] == "ENSG00000090861"      # newer HGNC symbol
    assert got[11] == "ENSG00000111640"
    assert all(v is None for v in got[12:])                                 # mouse names not human
    m = db.lookup(["Trp53", "TRP53", "trp53", TRP53 + ".5", "TP53", "Gapdh"], "mmu")
    assert list(m[:4]) == [TRP53] * 4 and m[4] is None and m[5] == "ENSMUSG00000057666"
    assert list(db.lookup("TP53", "hsa")) == [TP53]


def test_lookup_symbol_wins_over_alias():
    # "AMN" is an HGNC alias of ABCD1 and the current symbol of AMN (amnionless)
    amn = db.lookup("AMN", "hsa")[0]
    assert db.genes("hsa").loc[amn, "gene"] == "AMN"


def test_lookup_duplicated_symbols_tie_rule(hsa):
    dup = hsa[hsa["gene"].duplicated(keep=False)]
    assert len(dup) > 1000
    rank = dup.reset_index().assign(_nonpc=lambda d: d["biotype"] != "protein_coding",
                                    _scaf=lambda d: ~d["chromosome"].str.fullmatch(r"\d+|X|Y|MT"))
    expected = rank.sort_values(["gene", "_nonpc", "_scaf", "uid"]).drop_duplicates("gene")
    got = db.lookup(expected["gene"].tolist(), "hsa")
    assert list(got) == expected["uid"].tolist()
    # every uid still reaches its own gene
    assert (db.lookup(dup.index.tolist(), "hsa") == dup.index.to_numpy()).all()


def test_lookup_vectorised_all_symbols(hsa):
    t = time.perf_counter()
    got = db.lookup(hsa["gene"].tolist(), "hsa")
    assert time.perf_counter() - t < 5
    assert pd.notna(got).all()
    assert (hsa.loc[list(got), "gene"].to_numpy() == hsa["gene"].to_numpy()).all()


def test_unknown_taxa():
    for call in (lambda: db.genes("human"), lambda: db.lookup(["TP53"], "dme"),
                 lambda: db.homologs(["Trp53"], "mmu", "rno"), lambda: db.annotate(ad.AnnData(), "x")):
        with pytest.raises(InputError, match="valid taxa: hsa, mmu"):
            call()
    with pytest.raises(InputError):
        db.homologs(["TP53"], "hsa", "hsa")


# ----------------------------------------------------------------------------- homologs
def test_homologs():
    h = db.homologs(["Trp53", "Cd74", "Fau", "not-a-gene"])
    assert list(h["name"]) == ["Trp53", "Cd74", "Fau", "not-a-gene"]
    assert list(h["homolog_gene"][:3]) == ["TP53", "CD74", "FAU"]
    assert h.loc[0, "homolog"] == TP53 and h.loc[0, "uid"] == TRP53
    assert h.loc[3, "uid"] is None and h.loc[3, "homolog"] is None
    back = db.homologs(TP53, from_taxa="hsa", to_taxa="mmu")
    assert list(back["homolog"]) == [TRP53] and back.loc[0, "homolog_gene"] == "Trp53"
    many = db.homologs(["Adh1"])  # one mouse gene, three human (ADH1A/B/C)
    assert {"ADH1A", "ADH1B", "ADH1C"} <= set(many["homolog_gene"])
    assert list(many["homolog"]) == sorted(many["homolog"])


# ----------------------------------------------------------------------------- annotate
def test_annotate_dlpfc(shared_data, log_lines):
    for sample, n_mapped in (("151673", 4990), ("151674", 4985)):
        adata = _dlpfc(shared_data, sample)
        original = adata.var_names.tolist()
        res = db.annotate(adata, "hsa", sample=sample)
        assert res == {"n_features": 5000, "n_mapped": n_mapped, "n_unmapped": 5000 - n_mapped,
                       "n_duplicated": 0, "taxa": "hsa", "release": "Ensembl 98"}
        var = adata.var
        assert adata.n_vars == 5000 and var.index.is_unique
        assert var["db.feature"].tolist() == original
        mapped = var["db.mapped"].to_numpy()
        assert mapped.sum() == n_mapped
        # mapped: var_name is the uid = the Cell Ranger id, gene is the Cell Ranger symbol
        assert (var.index[mapped] == var["gene_ids"][mapped]).all()
        assert (var["gene"][mapped] == var["name"][mapped]).all()
        # unmapped (ids retired before Ensembl 98) kept under their own name, no annotation
        assert (var.index[~mapped] == var["db.feature"][~mapped]).all()
        assert var.loc[~mapped, "start"].isna().all() and not var.loc[~mapped, "ribo"].any()
        assert var.loc["ENSG00000123560", "gene"] == "PLP1"
        assert var.loc["ENSG00000123560", "chromosome"] == "X"
        assert adata.uns["db"]["params"] == {"taxa": "hsa", "release": "Ensembl 98"}
        assert f"sample {sample}: {n_mapped} of 5000 features mapped to hsa Ensembl 98; " \
               f"{5000 - n_mapped} unmapped kept (e.g. " in log_lines[-1]


def test_annotate_symbols_and_roundtrip(shared_data, tmp_path):
    adata = _dlpfc(shared_data, "151673")
    by_symbol = ad.AnnData(X=adata.X, var=pd.DataFrame(index=adata.var_names))
    db.annotate(adata, "hsa")
    res = db.annotate(by_symbol, "hsa")
    assert res["n_mapped"] == 4990
    # symbols are not unique in Ensembl 98: by symbol, two features resolve (by the tie rule) to
    # another gene of the same symbol than the Cell Ranger id (LINC01505, POLR2J3)
    differ = by_symbol.var_names != adata.var_names
    assert sorted(adata.var["gene"][differ]) == ["LINC01505", "POLR2J3"]
    assert (by_symbol.var["gene"].to_numpy() == adata.var["gene"].to_numpy()).all()
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(back.var, adata.var, check_categorical=False)
    again = db.annotate(back, "hsa")  # annotating twice changes nothing
    assert again["n_mapped"] == 4990 and (back.var_names == adata.var_names).all()
    pd.testing.assert_frame_equal(back.var, adata.var, check_categorical=False)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_annotate_duplicates_and_unmapped_are_kept_deterministically(log_lines):
    names = ["TP53", "GAPDH", "p53", "mystery", TP53 + ".3", "mystery", "mystery.1", "Tp53"]
    adata = ad.AnnData(X=sp.csr_matrix((1, len(names)), dtype=np.float32),
                       var=pd.DataFrame({"feature_types": "Gene Expression"},
                                        index=pd.Index(names)))
    res = db.annotate(adata, "hsa", sample="toy")
    assert list(adata.var_names) == [TP53, "ENSG00000111640", TP53 + ".1", "mystery", TP53 + ".2",
                                     "mystery.2", "mystery.1", TP53 + ".3"]
    assert list(adata.var["gene"]) == ["TP53", "GAPDH", "TP53", "mystery", "TP53", "mystery",
                                       "mystery.1", "TP53"]
    assert list(adata.var["db.mapped"]) == [True, True, True, False, True, False, False, True]
    assert (adata.var["feature_types"] == "Gene Expression").all()
    assert res["n_mapped"] == 5 and res["n_unmapped"] == 3 and res["n_duplicated"] == 4
    assert "sample toy: 5 of 8 features mapped" in log_lines[-1]
    assert "3 unmapped kept (e.g. mystery, mystery, mystery.1)" in log_lines[-1]


def test_annotate_wrong_taxa_warns(log_lines):
    adata = ad.AnnData(X=sp.csr_matrix((1, 3), dtype=np.float32),
                       var=pd.DataFrame(index=[TP53, "ENSG00000111640", "ENSG00000123560"]))
    res = db.annotate(adata, "mmu", sample="s")
    assert res["n_mapped"] == 0 and adata.n_vars == 3
    assert any("3 map to hsa" in line for line in log_lines)


# ----------------------------------------------------------------------------- symbols_to_uids
def test_symbols_to_uids(shared_data):
    adata = _dlpfc(shared_data, "151673")
    db.annotate(adata, "hsa")
    assert db.symbols_to_uids(adata, "PLP1") == "ENSG00000123560"
    got = db.symbols_to_uids(adata, ["MBP", "ENSG00000123560", "Snap25", "ENSG00000197971.14"])
    assert got == ["ENSG00000197971", "ENSG00000123560", "ENSG00000132639", "ENSG00000197971"]
    unmapped = adata.var_names[~adata.var["db.mapped"]][0]
    assert db.symbols_to_uids(adata, [unmapped]) == [unmapped]
    with pytest.raises(KeyNotFoundError, match="NOT_A_GENE, TP53"):
        db.symbols_to_uids(adata, ["MBP", "NOT_A_GENE", "TP53"])  # TP53 not in the top 5000


# ----------------------------------------------------------------------------- data, build
def test_data_location(monkeypatch, tmp_path):
    assert db.database_dir() == ROOT / "database"
    monkeypatch.setenv("EXPKIT_DATABASE", str(tmp_path))
    assert db.database_dir() == ROOT / "database"  # empty override folder is skipped
    (tmp_path / "hsa").mkdir()
    (tmp_path / "hsa" / "genes.tsv.gz").write_bytes(b"")
    assert db.database_dir() == tmp_path.resolve()


def test_installed_layout_is_the_same_files():
    # expkit/database_files is what a wheel ships (package-data); in a checkout it links to database/
    link = ROOT / "expkit" / "database_files"
    if not (link / "hsa" / "genes.tsv.gz").is_file():
        pytest.skip("expkit/database_files is not a working symlink in this checkout")
    assert link.resolve() == (ROOT / "database").resolve()


def test_committed_files_are_small():
    files = sorted((ROOT / "database").glob("*/*.tsv.gz"))
    assert {f"{p.parent.name}/{p.name}" for p in files} >= {
        "hsa/genes.tsv.gz", "hsa/aliases.tsv.gz", "mmu/genes.tsv.gz", "mmu/homologs.tsv.gz"}
    assert sum(p.stat().st_size for p in files) < 5_000_000


def test_import_is_light():
    code = ("import sys, expkit.database as d; d.lookup(['TP53'], 'hsa'); "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.slow
def test_build_is_reproducible(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("_expkit_db_build", ROOT / "database" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main(["--shared", str(shared_data), "--out", str(tmp_path)]) == 0
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in built] == ["hsa/aliases.tsv.gz", "hsa/genes.tsv.gz", "hsa/meta.json",
                                       "mmu/genes.tsv.gz", "mmu/homologs.tsv.gz", "mmu/meta.json"]
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (ROOT / "database" / rel).read_bytes(), rel
