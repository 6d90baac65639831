"""CaseOps: the lossless case transform, its tokenizer and byte sidecar, and the start-up check that val_bpb counts
the bytes of the original text."""

import random
import sys

import numpy as np
import pytest

import train_gpt as T
from conftest import REPO, run_script

ALPHABET = "aAbBzZ Ünï\n.'-1" + "".join(T.CASE_OPERATORS) + "\u2581"


def random_text(rng, length):
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def test_the_transform_is_lossless_and_canonical_on_any_text():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_text(rng, rng.randint(0, 30))
        encoded = T.case_encode(text)
        assert T.case_decode(encoded) == text
        assert T.case_encode(T.case_decode(encoded)) == encoded
        assert not any("A" <= c <= "Z" for c in encoded)  # every capital is now an operator and a small letter


def test_the_operators_say_how_each_word_was_written():
    title, allcaps, capnext, escape = T.CASE_OPERATORS
    assert T.case_encode("The NASA Launch") == f"{title}the {allcaps}nasa {title}launch"
    # a mixed-case run: TITLE for a capital first letter, CAPNEXT for each later one (the record's caseops_v1)
    assert T.case_encode("McDonald I x iPhone") == f"{title}mc{capnext}donald {title}i x i{capnext}phone"
    assert T.case_encode(f"a{title}b") == f"a{escape}{title}b"
    assert T.case_encode("Ünïcode") == "Ünïcode"  # only ASCII letters change


@pytest.mark.parametrize("bad", ["\ue002", "\ue001 word", "x\ue003", "\ue002A"])
def test_malformed_strings_are_refused(bad):
    with pytest.raises(ValueError, match="operator"):
        T.case_decode(bad)


def test_a_decodable_but_non_canonical_string_fails_the_round_trip():
    allcaps, title = T.CASE_OPERATORS[1], T.CASE_OPERATORS[0]
    assert T.case_decode(f"{allcaps}a") == "A" and T.case_encode("A") == f"{title}a"  # so a check can catch it


@pytest.fixture
def caseops_export(caseops_sample):
    return caseops_sample


def load(export):
    data_dir, tokenizer, _ = export
    sp = T.load_tokenizer(str(tokenizer), 1024)
    files = T.shard_files(str(data_dir), "val")
    return sp, files, T.load_validation_tokens(files).numpy(), T.load_byte_sidecar(files)


def test_the_sidecar_counts_the_bytes_of_the_original_documents(caseops_export):
    sp, files, tokens, sidecar = load(caseops_export)
    originals = caseops_export[2]
    assert [f.rsplit("/", 1)[1] for f in files] == ["fineweb_val_000000.bin"]  # the sidecar is not a token shard
    docs, total, differing, _ = T.check_caseops(sp, tokens, sidecar)
    assert differing == 0  # our exporter's sidecar is exact
    assert docs == len(originals) and total == sum(len(d.encode("utf-8")) for d in originals)
    assert T.TargetBytes(sidecar[1:]).total == total  # what evaluation divides by
    assert sidecar[tokens == sp.bos_id()].sum() == 0
    operators = np.isin(tokens, [sp.piece_to_id(op) for op in T.CASE_OPERATORS])
    assert operators.sum() > 100 and sidecar[operators].sum() == 0  # the text has operators; they count no byte


def test_the_start_up_check_refuses_a_wrong_sidecar_or_tokenizer(caseops_export, sample):
    sp, _, tokens, sidecar = load(caseops_export)
    tampered = sidecar.copy()
    tampered[5] += 1
    with pytest.raises(T.DataError, match="byte sidecar of validation document 0"):
        T.check_caseops(sp, tokens, tampered)
    with pytest.raises(T.DataError, match="entries"):
        T.check_caseops(sp, tokens, sidecar[:-1])
    plain_sp = T.load_tokenizer(str(sample[1]), 1024)  # the plain export's tokenizer: no operators
    with pytest.raises(T.ConfigError, match="CaseOps tokenizer"):
        T.caseops_byte_luts(plain_sp, 1024)
    plain_tokens = T.load_validation_tokens(T.shard_files(str(sample[0]), "val")).numpy()
    with pytest.raises((T.DataError, T.ConfigError)):  # plain shards read as CaseOps: the round trip fails
        T.check_caseops(sp, plain_tokens, np.zeros(len(plain_tokens), dtype=np.int64))


def test_the_ranks_share_the_documents_and_all_refuse_the_first_bad_one(caseops_export):
    sp, _, tokens, sidecar = load(caseops_export)
    bos = np.flatnonzero(tokens == sp.bos_id())
    tampered = sidecar.copy()
    tampered[bos[3] + 1] += 1  # document 3 of the three ranks' 0, 1, 2, 0, 1, 2, ...: rank 0's
    with pytest.raises(T.DataError, match="validation document 3 counts"):
        T.check_caseops(sp, tokens, tampered, rank=0, world_size=3)
    for rank in (1, 2):  # alone, the others never read document 3
        assert T.check_caseops(sp, tokens, tampered, rank=rank, world_size=3)[0] == len(bos)
        with pytest.raises(T.DataError, match="validation document 3 counts"):  # told by rank 0, they refuse it too
            T.check_caseops(sp, tokens, tampered, rank=rank, world_size=3, all_reduce_min=lambda index: min(index, 3))


def test_an_escaped_operator_is_text_and_counts_its_bytes(caseops_export):
    sp = T.load_tokenizer(str(caseops_export[1]), 1024)
    original = f"Say {T.CASE_ESCAPE}{T.CASE_TITLE} OK"
    tokens = [sp.bos_id()] + sp.encode(T.case_encode(original))
    counts = T.caseops_token_bytes(tokens, T.caseops_byte_luts(sp, 1024))
    assert counts.sum() == len(original.encode("utf-8"))
    assert T.check_caseops(sp, np.asarray(tokens), counts)[:2] == (1, len(original.encode("utf-8")))


def test_a_stream_that_is_not_the_transform_s_output_is_refused(caseops_export):
    """ALLCAPS before one letter decodes (to "A", with the right byte count) but case_encode writes TITLE there."""
    sp = T.load_tokenizer(str(caseops_export[1]), 1024)
    tokens = [sp.bos_id()] + sp.encode(f"{T.CASE_ALLCAPS}a day")
    counts = T.caseops_token_bytes(tokens, T.caseops_byte_luts(sp, 1024))
    assert counts.sum() == len("A day")
    with pytest.raises(T.DataError, match="round-trip"):
        T.check_caseops(sp, np.asarray(tokens), counts)


def test_caseops_without_its_sidecar_is_refused_before_training(caseops_export, tmp_path):
    data_dir, tokenizer, _ = caseops_export
    copy = tmp_path / "data"
    copy.mkdir()
    for shard in data_dir.glob("fineweb_*.bin"):
        if "bytes" not in shard.name:
            (copy / shard.name).write_bytes(shard.read_bytes())
    env = dict(PRESET="smoke", DATA_PATH=str(copy), TOKENIZER_PATH=str(tokenizer), CASEOPS_ENABLED="1")
    result = run_script([sys.executable, str(REPO / "train_gpt.py")], env, tmp_path)
    assert result.returncode != 0 and "step:1/" not in result.stdout
    assert "fineweb_val_bytes_000000.bin is missing" in result.stderr and "--caseops" in result.stderr


def test_caseops_data_without_caseops_enabled_is_refused_before_training(caseops_export, sample, tmp_path):
    """Scored by the LUTs, CaseOps data would count the transformed text's bytes (8.6% too many on FineWeb)."""
    data_dir, tokenizer, _ = caseops_export
    plain_data, plain_tokenizer = sample
    for data, tok, sign in ((data_dir, tokenizer, "a byte sidecar"), (plain_data, tokenizer, "a tokenizer with the")):
        sp = T.load_tokenizer(str(tok), 1024)
        assert sign in " and ".join(T.caseops_signs(T.shard_files(str(data), "val"), sp))
    assert T.caseops_signs(T.shard_files(str(plain_data), "val"), T.load_tokenizer(str(plain_tokenizer), 1024)) == []
    env = dict(PRESET="smoke", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer))
    result = run_script([sys.executable, str(REPO / "train_gpt.py")], env, tmp_path)
    assert result.returncode != 0 and "step:1/" not in result.stdout
    assert "are CaseOps data" in result.stderr and "set CASEOPS_ENABLED=1" in result.stderr


RECORD_TOKENIZER = "caseops_record/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def test_the_records_exporter_output_is_written_byte_for_byte(corpus, tmp_path):
    """prepare_docs.py --caseops with the 04-27 record's tokenizer writes the record exporter's validation shard and
    byte sidecar for the same documents, file for file."""
    import prepare_docs
    docs = corpus / "fineweb_docs_200.jsonl"
    out, _ = prepare_docs.prepare(str(docs), name="rec", tokenizer=corpus / RECORD_TOKENIZER, caseops=True,
                                  val_source=str(docs), output_root=tmp_path)
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        assert (out / name).read_bytes() == (corpus / "caseops_record" / name).read_bytes(), name


def test_the_records_own_data_is_accepted_and_scored_by_its_sidecar(corpus):
    sp = T.load_tokenizer(str(corpus / RECORD_TOKENIZER), 8192)
    files = T.shard_files(str(corpus / "caseops_record"), "val")
    tokens, sidecar = T.load_validation_tokens(files).numpy(), T.load_byte_sidecar(files)
    assert T.tokenizer_normalizes(sp)  # NFKC: the tokens cannot give back the original text
    check = T.check_caseops(sp, tokens, sidecar)
    assert check.documents == 200 and check.sidecar_bytes == int(np.asarray(sidecar, dtype=np.int64).sum())
    assert 0 < check.tokens_differing < len(tokens) // 1000  # NFKC and byte-fallback runs, counted, not refused
    assert T.TargetBytes(sidecar[1:]).total == check.sidecar_bytes  # what val_bpb divides by
    with pytest.raises(T.DataError, match="not this data's"):  # a sidecar one token off is another file's
        T.check_caseops(sp, tokens, np.roll(np.asarray(sidecar), 1))
