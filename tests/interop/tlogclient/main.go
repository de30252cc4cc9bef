// A transparency-log client written against Go's own sumdb packages (golang.org/x/mod/sumdb/note
// and sumdb/tlog), knowing nothing of the service but the C2SP formats: it verifies the latest
// checkpoint with a pinned verifier key, reads the tree through C2SP tiles (tlog's TileHashReader
// checks every tile it loads against the signed root), computes inclusion and consistency proofs
// itself, checks them, compares them with the service's JSON proofs, and checks each leaf against
// the entry bundles.
//
//	go run main.go BASE_URL VERIFIER_KEY OLD_SIZE
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

var base string

func get(path string) []byte {
	resp, err := http.Get(base + "/" + path)
	if err != nil {
		fail("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		fail("GET %s: %d %s", path, resp.StatusCode, body)
	}
	return body
}

func fail(format string, args ...any) {
	fmt.Printf("FAIL: "+format+"\n", args...)
	os.Exit(1)
}

// tiles reads C2SP tiles: tlog names them tile/<H>/<L>/<N>, C2SP drops the height (always 8).
type tiles struct{}

func (tiles) Height() int { return 8 }
func (tiles) ReadTiles(ts []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(ts))
	for i, t := range ts {
		out[i] = get("tile/" + strings.TrimPrefix(t.Path(), "tile/8/"))
	}
	return out, nil
}
func (tiles) SaveTiles([]tlog.Tile, [][]byte) {}

type proofJSON struct {
	Proof    []string `json:"proof"`
	LeafHash string   `json:"leaf_hash"`
}

func decode(proof []string) []tlog.Hash {
	var out []tlog.Hash
	for _, p := range proof {
		raw, err := base64.StdEncoding.DecodeString(p)
		if err != nil || len(raw) != 32 {
			fail("bad hash %q", p)
		}
		var h tlog.Hash
		copy(h[:], raw)
		out = append(out, h)
	}
	return out
}

func checkpoint(verifier note.Verifier) (origin string, tree tlog.Tree) {
	msg := get("checkpoint")
	n, err := note.Open(msg, note.VerifierList(verifier))
	if err != nil {
		fail("the checkpoint does not verify with the pinned key: %v", err)
	}
	lines := strings.Split(n.Text, "\n")
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("tree size line %q", lines[1])
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != 32 {
		fail("root line %q", lines[2])
	}
	tree.N = size
	copy(tree.Hash[:], root)
	return lines[0], tree
}

func main() {
	base = strings.TrimRight(os.Args[1], "/")
	verifier, err := note.NewVerifier(os.Args[2])
	if err != nil {
		fail("verifier key: %v", err)
	}
	oldSize, _ := strconv.ParseInt(os.Args[3], 10, 64)
	origin, tree := checkpoint(verifier)
	fmt.Printf("checkpoint: %s, %d leaves, signature verified by %s\n", origin, tree.N, verifier.Name())

	reader := tlog.TileHashReader(tree, tiles{})
	root, err := tlog.TreeHash(tree.N, reader)
	if err != nil || root != tree.Hash {
		fail("the tiles do not give the signed root: %v", err)
	}
	// Every leaf, from the entry bundles, is the leaf hash the tiles hold.
	var entries [][]byte
	for n := int64(0); n*256 < tree.N; n++ {
		width := tree.N - n*256
		path := tlog.Tile{H: 8, L: 0, N: n, W: 256}.Path()
		if width < 256 {
			path = tlog.Tile{H: 8, L: 0, N: n, W: int(width)}.Path()
		}
		bundle := get("tile/entries/" + strings.TrimPrefix(path, "tile/8/0/"))
		for len(bundle) > 0 {
			size := int(bundle[0])<<8 | int(bundle[1])
			entries = append(entries, bundle[2:2+size])
			bundle = bundle[2+size:]
		}
	}
	if int64(len(entries)) != tree.N {
		fail("%d entries for %d leaves", len(entries), tree.N)
	}
	for index, entry := range entries {
		leaf, err := tlog.TileHashReader(tree, tiles{}).ReadHashes([]int64{tlog.StoredHashIndex(0, int64(index))})
		if err != nil || leaf[0] != tlog.RecordHash(entry) {
			fail("leaf %d: the entry does not hash to the tiles' leaf (%v)", index, err)
		}
	}
	fmt.Printf("entries: all %d hash to the tiles' leaves\n", len(entries))

	for _, index := range []int64{0, tree.N / 2, tree.N - 1} {
		proof, err := tlog.ProveRecord(tree.N, index, reader)
		if err != nil {
			fail("ProveRecord(%d): %v", index, err)
		}
		if err := tlog.CheckRecord(proof, tree.N, tree.Hash, index, tlog.RecordHash(entries[index])); err != nil {
			fail("CheckRecord(%d): %v", index, err)
		}
		var served proofJSON
		json.Unmarshal(get(fmt.Sprintf("events/%d/inclusion?tree_size=%d", index+1, tree.N)), &served)
		if fmt.Sprint(decode(served.Proof)) != fmt.Sprint([]tlog.Hash(proof)) {
			fail("the service's inclusion proof for leaf %d differs from tlog's", index)
		}
	}
	fmt.Println("inclusion: tlog's proofs verify and equal the service's")

	oldRoot, err := tlog.TreeHash(oldSize, reader)
	if err != nil {
		fail("TreeHash(%d): %v", oldSize, err)
	}
	proof, err := tlog.ProveTree(tree.N, oldSize, reader)
	if err != nil {
		fail("ProveTree: %v", err)
	}
	if err := tlog.CheckTree(proof, tree.N, tree.Hash, oldSize, oldRoot); err != nil {
		fail("CheckTree: %v", err)
	}
	var served proofJSON
	json.Unmarshal(get(fmt.Sprintf("log/consistency?first=%d&second=%d", oldSize, tree.N)), &served)
	if !bytes.Equal([]byte(fmt.Sprint(decode(served.Proof))), []byte(fmt.Sprint([]tlog.Hash(proof)))) {
		fail("the service's consistency proof differs from tlog's")
	}
	fmt.Printf("consistency: %d -> %d verifies and equals the service's\n", oldSize, tree.N)
	fmt.Println("OK")
}
