/** Recorded in every manifest, so a repository says which release wrote each backup. */
export const TOOL_VERSION = '0.2.0';
