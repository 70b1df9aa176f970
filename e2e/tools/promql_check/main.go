// promql-check: parses each PromQL expression of a JSON list on stdin; prints one error line per bad one.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	var exprs []string
	if err := json.NewDecoder(os.Stdin).Decode(&exprs); err != nil {
		fmt.Fprintln(os.Stderr, "promql-check: stdin is not a JSON list of strings:", err)
		os.Exit(2)
	}
	p := parser.NewParser(parser.Options{})
	bad := 0
	for _, expr := range exprs {
		if _, err := p.ParseExpr(expr); err != nil {
			fmt.Printf("%q: %v\n", expr, err)
			bad++
		}
	}
	if bad > 0 {
		os.Exit(1)
	}
}
